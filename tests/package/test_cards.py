"""Hub-ready model directories: cards that `ModelCard.load` reads with license, base_model
(Hub ids or run names, never machine paths), tags, library and pipeline; tokenizers cut to
the model's window; `cbd push` up to the upload call (HfApi mocked: no network here)."""
from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
from huggingface_hub import ModelCard

from cbd_ray import cli
from cbd_ray.cards import TAGS, distilled_card, identity, write_card
from cbd_ray.interpolate import AnchorPair
from cbd_ray.push import push_run
from cbd_ray.tiny import save_tiny_model

POSITIONS = 128


def _anchor(root: Path, name: str, tokenizer, layers: int, hidden: int, heads: int, license_: str | None) -> Path:
    d = save_tiny_model(root / name, "gpt2", tokenizer, seed=layers, layers=layers, hidden=hidden, heads=heads,
                        max_positions=POSITIONS)
    if license_:
        ModelCard(f"---\nlicense: {license_}\n---\n# {name}\n").save(d / "README.md")
    return d


@pytest.fixture
def pair_dirs(tmp_path, tokenizer):
    small = _anchor(tmp_path, "small", tokenizer, 2, 32, 2, "mit")
    large = _anchor(tmp_path, "large", tokenizer, 3, 64, 4, "mit")
    # the large anchor came from the Hub: its stage recorded the Hub id
    (large / "model.json").write_text(json.dumps({"model": "openai-community/gpt2", "kind": "hub",
                                                  "name": "openai-community/gpt2"}))
    return small, large


def test_target_card_has_hub_metadata_and_no_machine_path(pair_dirs, tmp_path):
    small, large = pair_dirs
    AnchorPair(small, large).make("3x48x3", tmp_path / "out" / "mid", alpha=0.5)
    text = (tmp_path / "out" / "mid" / "README.md").read_text()
    data = ModelCard.load(tmp_path / "out" / "mid" / "README.md").data
    assert data.license == "mit"
    assert data.base_model == ["small", "openai-community/gpt2"]
    assert set(TAGS) <= set(data.tags) and data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert "0.5000" in text and "| **this model** | 3 | 48 | 3 |" in text
    assert str(tmp_path) not in text


def test_unknown_license_is_other_and_anchor_names_are_run_names(tmp_path, tokenizer):
    small = _anchor(tmp_path, "a2", tokenizer, 2, 32, 2, None)
    large = _anchor(tmp_path, "a1", tokenizer, 3, 64, 4, "apache-2.0")
    AnchorPair(small, large).make("2x48x3", tmp_path / "t", alpha="auto")
    data = ModelCard.load(tmp_path / "t" / "README.md").data
    assert data.license == "other" and data.license_name == "unknown"
    assert data.base_model == ["a2", "a1"]


def test_a_300_token_prompt_is_cut_to_the_window_and_generates(pair_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    small, large = pair_dirs
    AnchorPair(small, large).make("3x48x3", tmp_path / "mid", alpha=0.5)
    for d in (small, tmp_path / "mid"):
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d)
        assert tok.model_max_length == model.config.n_positions == POSITIONS
        text = " ".join(f"word{i} and more" for i in range(300))
        assert len(tok(text)["input_ids"]) > 300
        new = 4
        ids = tok(text, truncation=True, max_length=tok.model_max_length - new, return_tensors="pt")["input_ids"]
        assert len(tok(text, truncation=True)["input_ids"]) == POSITIONS
        out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=tok.eos_token_id)
        assert out.shape[1] == POSITIONS


def test_distilled_card_names_its_teacher_by_hub_id(pair_dirs, tmp_path):
    small, large = pair_dirs
    card = distilled_card("a1", identity(large), identity(small), {"objective": "kd", "steps": 5},
                          {"eval_loss": 2.5, "out": "/somewhere"})
    path = write_card(small, card)
    data = ModelCard.load(path).data
    assert data.base_model == ["openai-community/gpt2"] and data.license == "mit"  # the teacher it came from
    assert "distilled from `openai-community/gpt2`" in path.read_text() and "2.5" in path.read_text()


def test_push_uploads_each_model_with_its_card_and_no_paths(pair_dirs, tmp_path):
    small, large = pair_dirs
    run = tmp_path / "run"
    AnchorPair(small, large).make("3x48x3", run / "targets" / "mid", alpha=0.5)
    (run / "targets" / "targets.json").write_text(json.dumps([{"name": "mid", "path": "mid"}]))
    (run / "evaluation").mkdir()
    (run / "evaluation" / "evaluation.json").write_text(json.dumps(
        [{"model": "mid", "kind": "target", "heldout_nll": 3.25, "random_nll": 6.5}]))
    seen = {}

    def upload_folder(folder_path, repo_id, **kw):
        folder = Path(folder_path)
        seen[repo_id] = {f.name: f.read_text() for f in folder.iterdir() if f.suffix in (".md", ".json")}
        return mock.Mock(commit_url=f"https://hub/{repo_id}/commit/1")

    api = mock.Mock()
    api.upload_folder.side_effect = upload_folder
    before = (run / "targets" / "mid" / "cbd.json").read_text()
    recs = push_run(run, "org/cbd", targets=["mid"], api=api)
    api.create_repo.assert_called_once_with(repo_id="org/cbd", repo_type="model", private=False, exist_ok=True)
    assert recs[0]["repo"] == "org/cbd" and "model.safetensors" in recs[0]["files"]
    files = seen["org/cbd"]
    assert "3.25" in files["README.md"] and str(tmp_path) not in files["cbd.json"] + files["README.md"]
    assert (run / "targets" / "mid" / "cbd.json").read_text() == before  # the run is untouched
    import shutil

    shutil.copytree(small, run / "models" / "a2")
    with mock.patch("huggingface_hub.HfApi", return_value=api):
        assert cli.main(["push", str(run), "--repo", "org/cbd"]) == 0  # every model: one repo each
    assert {c.kwargs["repo_id"] for c in api.create_repo.call_args_list[1:]} == {"org/cbd-mid", "org/cbd-a2"}
    assert cli.main(["push", str(run), "--repo", "not a repo"]) == 2
    assert cli.main(["push", str(run), "--repo", "org/x", "--targets", "nope"]) == 2


def test_a_distilled_card_in_a_stage_folder_gets_the_models_name_and_an_unknown_license(pair_dirs, tmp_path):
    from cbd_ray.cards import write_distilled_card

    small, large = pair_dirs
    (tmp_path / ".a1.partial").mkdir()
    (large / "README.md").unlink()  # no license known for the teacher
    path = write_distilled_card(tmp_path / ".a1.partial", ".a1.partial", large, small, {"objective": "kd"}, {})
    data = ModelCard.load(path).data
    assert data.model_name == "a1" and data.license == "other" and data.license_name == "unknown"
