"""The shipped course model: corpus, tokenizer, files, load time, quality record, rebuild."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from course_utils import corpus
from course_utils import course_model as cm
from course_utils.models import load_model

ASSET = cm.asset_dir()


@pytest.fixture(scope="module")
def model():
    return load_model("course-2l")


# -- corpus -----------------------------------------------------------------------------------
def test_corpus_files_are_sorted_and_exclude_tests():
    files = corpus.list_files()
    paths = [f.relative_path for f in files]
    assert paths == sorted(paths)
    assert "os.py" in paths and "json/decoder.py" in paths
    for path in paths:
        parts = path.split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts[:-1]), path
    assert "encodings/cp1252.py" not in paths  # a generated codec table


def test_split_is_fixed_by_path_hash():
    assert corpus.split_of("os.py") == corpus.split_of("os.py")
    splits = [f.split for f in corpus.list_files()]
    share = splits.count("validation") / len(splits)
    assert 0.02 < share < 0.1
    with pytest.raises(ValueError, match="split must be"):
        corpus.split_files("test")


def test_missing_stdlib_sources_give_a_clear_error(tmp_path):
    with pytest.raises(corpus.StdlibSourcesMissingError, match="does not exist"):
        corpus.list_files(tmp_path / "nowhere")
    (tmp_path / "abc.py").write_text("x = 1\n")
    with pytest.raises(corpus.StdlibSourcesMissingError, match="look stripped"):
        corpus.list_files(tmp_path)


# -- tokenizer --------------------------------------------------------------------------------
TEXTS = [
    "def f(x):\n    return x + 1\n",
    "import os\nfrom collections import OrderedDict\n",
    "# Unicode survives: café, naïve, 数据, emoji 🐍\n",
    "\t\tx = {'a': [1, 2, (3,)]}  \r\n",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text(model, text):
    tokens = model.to_tokens(text)
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id == 0
    assert model.to_string(tokens[0, 1:]) == text
    if text.isascii():  # byte-level tokens may split a multi-byte character
        assert "".join(model.to_str_tokens(text, prepend_bos=False)) == text


def test_tokenizer_has_4096_tokens_and_an_end_of_text_token(model):
    assert model.cfg.d_vocab == len(model.tokenizer) == 4096
    assert model.tokenizer.convert_ids_to_tokens(0) == corpus.END_OF_TEXT
    assert model.to_str_tokens("import os")[:2] == [corpus.END_OF_TEXT, "import"]
    # no second BOS: the tokenizer prepends it and TransformerLens knows
    assert (model.to_tokens("x = 1")[0] == 0).sum().item() == 1


# -- model files ------------------------------------------------------------------------------
def test_architecture(model):
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_mlp) == (2, 128, 4, 512)
    assert cfg.normalization_type == "LN" and not cfg.attn_only
    assert "blocks.1.mlp.hook_post" in model.hook_dict


def test_loads_in_one_call_under_two_seconds():
    load_model("course-2l")  # warm imports
    start = time.perf_counter()
    loaded = load_model("course-2l")
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"load took {elapsed:.2f} s"
    assert not loaded.training


def test_shipped_assets_are_small_and_match_their_record():
    total = sum(p.stat().st_size for p in ASSET.parent.rglob("*") if p.is_file())
    assert total < 15 * 2**20, f"shipped assets are {total / 2**20:.1f} MB"
    metadata = cm.read_metadata()
    for name, digest in metadata["files_sha256"].items():
        assert cm.sha256_file(ASSET / name) == digest, name


def test_recorded_quality_beats_the_bigram_baseline():
    evaluation = cm.read_metadata()["evaluation"]
    assert evaluation["validation_loss"] < evaluation["bigram_validation_loss"] - 0.5
    assert evaluation["bigram_validation_loss"] < evaluation["unigram_validation_loss"]


def test_model_predicts_python(model):
    """A quick live check: the loss on a typical stdlib snippet is far below uniform (8.3)."""
    text = (
        "import os\nimport sys\n\n\ndef main(argv=None):\n"
        '    """Run the program."""\n    if argv is None:\n        argv = sys.argv[1:]\n'
        "    for name in argv:\n        print(os.path.basename(name))\n    return 0\n"
    )
    with torch.no_grad():
        loss = model(text, return_type="loss").item()
    assert loss < 3.0, loss


# -- missing / corrupt files ------------------------------------------------------------------
@pytest.fixture
def asset_copy(tmp_path) -> Path:
    target = tmp_path / "course-2l"
    shutil.copytree(ASSET, target)
    return target


def test_missing_weights_name_the_file_and_the_rebuild_command(asset_copy):
    (asset_copy / cm.WEIGHTS_FILE).unlink()
    with pytest.raises(cm.CourseModelFileError) as info:
        load_model(str(asset_copy))
    assert cm.WEIGHTS_FILE in str(info.value) and cm.REBUILD_COMMAND in str(info.value)


@pytest.mark.parametrize("name", [cm.WEIGHTS_FILE, cm.CONFIG_FILE, cm.TOKENIZER_FILE])
def test_corrupt_files_name_the_file_and_the_rebuild_command(asset_copy, name):
    path = asset_copy / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(cm.CourseModelFileError) as info:
        load_model(str(asset_copy))
    assert name in str(info.value) and cm.REBUILD_COMMAND in str(info.value)


def test_weights_of_the_wrong_shape_are_reported(asset_copy):
    config = json.loads((asset_copy / cm.CONFIG_FILE).read_text())
    config["architecture"]["d_mlp"] = 256
    (asset_copy / cm.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(cm.CourseModelFileError, match="model.safetensors"):
        load_model(str(asset_copy))


# -- rebuild ----------------------------------------------------------------------------------
def test_learning_rate_schedule():
    config = cm.BuildConfig()
    assert cm.learning_rate(0, config) == pytest.approx(config.lr / config.warmup_steps)
    assert cm.learning_rate(config.warmup_steps, config) == pytest.approx(config.lr)
    assert cm.learning_rate(config.steps, config) == pytest.approx(config.lr * 0.1)


@pytest.mark.slow
def test_short_rebuild_reproduces_the_recorded_first_losses(tmp_path):
    """Retrain the tokenizer and the first steps from scratch: same losses as the shipped build."""
    metadata = cm.read_metadata()
    config = cm.BuildConfig(**metadata["build_config"])
    config.steps = len(metadata["first_losses"])
    rebuilt = cm.build(config, tmp_path / "rebuilt", log=lambda line: None, evaluate_model=False)
    assert rebuilt["corpus"]["fingerprint"] == metadata["corpus"]["fingerprint"], (
        "this interpreter's stdlib differs from the one the shipped model was built on"
    )
    assert (tmp_path / "rebuilt" / cm.TOKENIZER_FILE).read_bytes() == (
        ASSET / cm.TOKENIZER_FILE
    ).read_bytes()
    assert rebuilt["first_losses"] == pytest.approx(metadata["first_losses"], abs=1e-4)
