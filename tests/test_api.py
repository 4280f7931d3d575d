"""The package's public API: every entry point named in `cde_workbench.__all__` (and in the README) resolves to the
module's own object, and `import cde_workbench` stays instant: it loads no heavy library until a name is used."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_is_light_and_names_load_on_first_use():
    probe = ('import sys, time; t = time.perf_counter(); import cde_workbench; dt = time.perf_counter() - t\n'
             'heavy = [m for m in ("sklearn", "polars", "sqlalchemy", "papermill", "numpy") if m in sys.modules]\n'
             'from cde_workbench import load_deployment\n'
             'print(heavy, "sklearn" in sys.modules, round(dt, 3))')
    r = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    heavy, sk, _ = r.stdout.rsplit(' ', 2)
    assert heavy == '[]' and sk == 'False', r.stdout   # the config entry point loads no scikit-learn either


def test_every_exported_name_is_the_modules_own():
    import importlib
    import cde_workbench
    for name, module in cde_workbench._API.items():
        obj = getattr(cde_workbench, name)
        assert obj is getattr(importlib.import_module(f'cde_workbench.{module}'), name), name
        assert name in dir(cde_workbench) and name in cde_workbench.__all__
    try: cde_workbench.no_such_thing; raise AssertionError
    except AttributeError as e: assert 'no_such_thing' in str(e)


def test_readme_shows_the_api_and_points_to_the_design_page_in_the_repository():
    import cde_workbench
    readme = (ROOT / 'README.md').read_text()
    section = readme.split('## From Python', 1)[1].split('\n## ', 1)[0]
    shown = set(re.findall(r'`([A-Za-z_][A-Za-z0-9_]*)`', section))
    missing = [n for n in cde_workbench._API if n not in shown]
    assert not missing, f'README does not show {missing}'
    assert 'docs/DESIGN.md' in readme and (ROOT / 'docs' / 'DESIGN.md').exists() and 'shared folder' not in readme
