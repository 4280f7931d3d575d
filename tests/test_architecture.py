"""Imports point one way, down the data flow: a module imports only modules of notebooks numbered before its own.

Known exceptions are listed with the reason they remain; the test fails on any new one, and on a listed one
that has gone (so the list only shrinks)."""
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / 'cde_workbench'

KNOWN: dict = {  # (importing notebook, imported notebook): why it is still there; empty, and the test keeps it so
}


def notebook_of(path: Path) -> str | None:
    m = re.search(r'File to edit: \.\./nbs/(\w+)\.ipynb', path.read_text())
    return m.group(1) if m else None


def upward_imports() -> set[tuple[str, str]]:
    nb = {p.stem: notebook_of(p) for p in PKG.glob('*.py')}
    found = set()
    for p in PKG.glob('*.py'):
        if not nb.get(p.stem): continue
        for line in p.read_text().splitlines():
            m = re.match(r'\s*(?:from (?:\.|cde_workbench\.)(\w+) import|import cde_workbench\.(\w+))', line)
            target = m and (m.group(1) or m.group(2))
            if target in nb and nb[target] and nb[target] > nb[p.stem]: found.add((nb[p.stem], nb[target]))
    return found


def test_imports_point_down_the_data_flow():
    found = upward_imports()
    new = found - set(KNOWN)
    assert not new, f'imports from a lower stage to a higher one: {sorted(new)}'
    gone = set(KNOWN) - found
    assert not gone, f'these exceptions are gone: remove them from KNOWN: {sorted(gone)}'


def test_the_base_module_imports_nothing_of_the_workbench():
    "Errors, the workspace and time helpers (00_config) stand on their own: every other module may import them."
    src = (PKG / 'config.py').read_text()
    assert not re.search(r'^\s*(from (\.|cde_workbench)|import cde_workbench)', src, re.M)
