"""Packaging for cde_workbench, driven by settings.ini (nbdev 2 layout)."""
from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
c = cfg['DEFAULT']
requirements = c.get('requirements', '').split()
console_scripts = [s for s in c.get('console_scripts', '').split() if s]

setuptools.setup(
    name=c['lib_name'].replace('_', '-'),
    version=c['version'],
    description=c['description'],
    author=c['author'],
    author_email=c['author_email'],
    license='Apache Software License 2.0',
    packages=setuptools.find_packages(include=['cde_workbench', 'cde_workbench.*']),
    include_package_data=True,
    install_requires=requirements,
    python_requires='>=' + c['min_python'],
    entry_points={'console_scripts': console_scripts, 'nbdev': [f"{c['lib_path']}={c['lib_path']}._modidx:d"]},
    zip_safe=False,
)
