"""The config key reference: every key has a doc comment, sections filter, the generated part of
docs/reference.md is current, and `ablate config diff` compares resolved configs."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml
from ablate_testing import REPO, write_config

from models.registry import MIXERS
from train import keys
from train.cli import main
from train.config import dump_config, load_config, resolve_config

# Config classes whose fields may still lack a doc comment (being rewritten); empty it when done.
UNDOCUMENTED_FOR_NOW: set[str] = set()

SMALL = {"device": "cpu", "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
         "tokenizer": {"vocab_size": 384}, "data": {"seq_len": 32}, "optim": {"lr": 1.0e-2}}


def test_every_config_key_has_a_doc_comment():
    missing = [f"{r.owner}.{r.key.rsplit('.', 1)[-1]} ({r.key})" for r in keys.all_rows()
               if not r.doc and r.owner.rsplit(".", 1)[-1] not in UNDOCUMENTED_FOR_NOW]
    assert not missing, "config fields without a trailing '# doc' comment:\n  " + "\n  ".join(missing)


def test_every_registered_mixer_kind_is_listed_with_its_keys():
    rows = keys.key_rows("model.layers.mixers")
    for kind in MIXERS.names():
        cls = MIXERS.config_class(kind)
        if cls is None:
            continue
        listed = {r.key.rsplit(".", 1)[-1] for r in rows if r.variant == f"kind: {kind}"}
        assert listed == set(cls.__dataclass_fields__), kind
    assert "model.layers.mixers.<LETTER>.window" in {r.key for r in rows}
    # a real letter reads as <LETTER>
    assert [r.key for r in keys.key_rows("model.layers.mixers.A.window")] == ["model.layers.mixers.<LETTER>.window"]


def test_data_sources_sections_are_listed():
    sections = keys.source_sections()
    rows = {r.key: r for r in keys.key_rows("data")}
    for name, cls in sections.items():
        assert {f"data.{name}.{f}" for f in cls.__dataclass_fields__} <= set(rows), name
    assert any(k.startswith("data.hf.") for k in rows)        # a registered source or a nested field


@dataclass
class _Example:
    plain: int = 1                 # one line
    joined: list[str] = field(default_factory=list)   # first part,
                                   # second part
    # a leading comment belongs to what follows, not to `joined`
    bare: float = 0.5
    last: str | None = None        # doc # with a hash


def test_field_docs_reads_trailing_and_continued_comments():
    assert keys.field_docs(_Example) == {"plain": "one line", "joined": "first part, second part", "bare": "",
                                         "last": "doc # with a hash"}
    from train.config import Config
    assert keys.field_docs(Config)["init_from_allow_new"] == \
        "globs of parameters init_from may leave to fresh init (new modules)"


def test_rows_carry_type_and_default():
    (row,) = keys.key_rows("optim.betas")
    assert (row.type, row.default) == ("tuple[float, float]", "[0.9, 0.95]")
    (row,) = keys.key_rows("model.n_kv_heads")
    assert (row.type, row.default) == ("int | null", "null")


def test_config_keys_command(capsys):
    assert main(["config", "keys", "optim.schedule"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("optim.schedule.") for line in lines)
    assert any(line.startswith("optim.schedule.warmup") and "int" in line and "warmup" in line for line in lines)

    assert main(["config", "keys", "model.layers.mixers"]) == 0
    out = capsys.readouterr().out
    assert "kind: attention" in out and "model.layers.mixers.<LETTER>.window" in out


def test_config_keys_unknown_section_exits_2_with_a_suggestion(capsys):
    assert main(["config", "keys", "optim.shedule"]) == 2
    err = capsys.readouterr().err
    assert "optim.shedule" in err and "did you mean 'optim.schedule'" in err


def test_reference_key_part_is_current():
    text = (REPO / "docs" / "reference.md").read_text()
    part = keys.generated_part(text)
    assert part is not None, f"docs/reference.md lacks the {keys.BEGIN} / {keys.END} lines"
    assert part == keys.reference_markdown().strip("\n"), \
        f"docs/reference.md's key reference is stale: run `{keys.REGENERATE}`"


def test_write_rewrites_only_the_generated_part(tmp_path, capsys):
    path = tmp_path / "ref.md"
    path.write_text(f"# head\n\n{keys.BEGIN}\nold\n{keys.END}\ntail\n")
    assert keys.main(["--write", str(path)]) == 0
    text = path.read_text()
    assert text.startswith(f"# head\n\n{keys.BEGIN}\n### Top-level keys") and text.endswith(f"{keys.END}\ntail\n")
    assert keys.generated_part(text) == keys.reference_markdown().strip("\n")
    (tmp_path / "plain.md").write_text("no markers\n")
    assert keys.main(["--write", str(tmp_path / "plain.md")]) == 2


# ----------------------------------------------------------------------------- config diff
def test_config_diff_of_two_files(tmp_path, capsys):
    a = write_config(tmp_path / "a.yaml", SMALL)
    b = tmp_path / "b.yaml"
    b.write_text(yaml.safe_dump({"base": "a.yaml", "optim": {"lr": 1.0e-3},
                                 "model": {"layers": {"pattern": "AS", "mixers": {
                                     "A": {"kind": "attention"}, "S": {"kind": "attention", "window": 8}}}}}))
    assert main(["config", "diff", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["model.layers.pattern: A -> AS", "optim.lr: 0.01 -> 0.001", "name: a -> b"]
    new = lines[3:]                              # every key of the new mixer, as absent in A
    assert "model.layers.mixers.S.kind: (absent) -> attention" in new
    assert "model.layers.mixers.S.window: (absent) -> 8" in new
    assert all(line.startswith("model.layers.mixers.S.") and ": (absent) -> " in line for line in new)
    assert main(["config", "diff", str(a), str(a)]) == 0
    assert capsys.readouterr().out == "no differences\n"


def test_config_diff_of_a_run_dir_and_its_config(tmp_path, capsys):
    path = write_config(tmp_path / "tiny.yaml", SMALL)
    cfg = load_config(path)
    derived = resolve_config(cfg)                 # what the trainer writes into config.yaml
    run = tmp_path / "run"
    run.mkdir()
    version = {"git_sha": "0123456789abcdef", "dirty": True}
    (run / "config.yaml").write_text(dump_config(cfg, {"derived": derived, "code_version": version}))
    assert main(["config", "diff", str(path), str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "no differences", "note: code_version (config file) -> 0123456789ab (dirty) (a record, not compared)"]

    assert main(["config", "diff", str(path), str(tmp_path)]) == 2        # a folder without config.yaml
    assert "no config.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("value", [None, True, 3, 0.5, "x", "", [1, 2], {"a": [1]}, (0.9, 0.95)])
def test_format_value_is_yaml(value):
    expected = list(value) if isinstance(value, tuple) else value
    assert yaml.safe_load(keys.format_value(value)) == expected
