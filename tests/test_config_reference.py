"""The configuration reference (README summary and docs/configuration.md) is the generator's output, every
key is documented, and every relative link in the README and docs/ resolves."""

import dataclasses
import re
from pathlib import Path

import pytest

from models.config import MLAConfig
from train import config_reference
from train.config import MODEL_EXTRA_KEYS, SECTIONS
from train.config_rules import DEPRECATED_KEYS

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_and_docs_hold_exactly_the_generated_reference():
    stale = config_reference.stale_files(ROOT)
    assert not stale, f"{stale}: the configuration reference is stale; run {config_reference.REGENERATE}"


def test_every_config_key_and_deprecated_alias_has_a_row():
    documented = {key for rows in config_reference.all_rows().values() for key, _, _ in rows}
    expected = {f"model.{f.name}" for f in dataclasses.fields(MLAConfig)}
    expected |= {f"model.{key}" for key in MODEL_EXTRA_KEYS}
    expected |= {f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    expected |= {f"{name}.{old}" for name, renames in DEPRECATED_KEYS.items() for old in renames}
    assert documented == expected
    assert "distributed.recompute" in documented and "distributed.activation_checkpointing" in documented


def test_the_full_reference_shows_defaults_as_yaml_and_escapes_pipes():
    text = config_reference.full_reference()
    assert "| `distributed.recompute` | `none` |" in text
    assert "| `optim.betas` | `[0.9, 0.95]` |" in text
    assert '| `train.sample_prompt` | `"def "` |' in text
    assert "| `model.rms_norm_eps` | `1e-6` |" in text
    assert "Deprecated alias of `distributed.recompute`" in text
    assert "<\\|endoftext\\|>" in text  # a bare | would end the table cell


def test_a_field_without_a_docstring_is_an_error_naming_it():
    @dataclasses.dataclass
    class Undocumented:
        documented: int = 1
        """Has one."""
        bare: int = 2

    with pytest.raises(ValueError, match=r"extra\.bare has no field docstring"):
        config_reference._rows_of("extra", Undocumented)


def test_the_command_prints_the_reference_and_checks_it(capsys):
    assert config_reference.main([]) == 0
    assert capsys.readouterr().out == config_reference.full_reference()
    assert config_reference.main(["--summary"]) == 0
    assert capsys.readouterr().out == config_reference.summary()
    assert config_reference.main(["--check"]) == 0


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(path: Path) -> str:
    """The file's text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(path)):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", _prose(resolved), flags=re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"
