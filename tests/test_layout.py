"""The house rules a newcomer relies on: small files (none in ddil_core over 450 lines), one concept per file."""
from tests import ROOT

MAX_LINES = 450


def test_no_ddil_core_file_is_over_450_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for p in (ROOT / "ddil_core").rglob("*.py")}
    assert len(sizes) > 50
    too_long = {path: n for path, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"split these where their concerns part: {too_long}"
