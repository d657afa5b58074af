"""docs/config/ is what `python -m dsframe.confdocs` writes from the code: it cannot drift."""
import dataclasses

import pytest

from dsframe import confdocs
from tests.conftest import REPO


@pytest.fixture(scope="module")
def pages():
    return confdocs.pages()  # imports every component once (the slow part)


def test_committed_config_pages_match_the_code(pages):
    committed = REPO / "docs" / "config"
    differ = [name for name, text in pages.items()
              if not (committed / name).exists() or (committed / name).read_text() != text]
    assert not differ, f"regenerate with: python -m dsframe.confdocs  (differ: {differ})"


def test_pages_hold_every_option_with_its_check(pages, monkeypatch, tmp_path, capsys):
    from dsframe_prune.plugin import PruneConfig

    for f in dataclasses.fields(PruneConfig):
        assert f"`plugins.prune.{f.name}`" in pages["plugins.md"]
    # the allowed text is what the check itself raises
    assert "| `plugins.prune.amount` | float | `0.5` | a fraction in [0, 1) |" in pages["plugins.md"]
    assert "| `optim.lr` | float | `5e-05` | a float > 0 |" in pages["optim.md"]
    assert "`logger=tensorboard`" in pages["logger.md"]
    # the command: writes the pages, then --check passes; a changed page fails it
    monkeypatch.setattr(confdocs, "pages", lambda: pages)
    assert confdocs.main([str(tmp_path)]) == 0 and confdocs.main(["--check", str(tmp_path)]) == 0
    (tmp_path / "optim.md").write_text("stale\n")
    assert confdocs.main(["--check", str(tmp_path)]) == 1
    assert "optim.md" in capsys.readouterr().err
