"""`jaxllm generate` and `jaxllm eval` on the checkpoint of a tiny pretraining run."""

import json
import types

import jax
import numpy as np
import pytest

from helpers import tiny_model
from jaxllm import config as config_lib
from jaxllm import parallel
from jaxllm.cli import _growing_text, _toolbox, main
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.loop import pretrain
from jaxllm.train.optimizer import make_optimizer
from jaxllm.train.run import load_run
from jaxllm.train.state import abstract_state


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = config_lib.Config(
        model=tiny_model(),
        mesh=config_lib.MeshConfig(data=2, fsdp=4),
        data=config_lib.DataConfig(train_size=200, validation_size=20, test_size=20),
        train=config_lib.TrainConfig(steps=3, batch_size=8, seq_len=64, warmup_steps=1,
                                     eval_every=0),
        workdir=str(workdir),
    )
    pretrain(config, log=lambda _: None)
    return workdir


def test_load_run_restores_the_weights_of_a_whole_restore_without_the_optimizer(trained):
    config, model, state = load_run(trained)
    assert state.opt_state is None
    target = abstract_state(model, make_optimizer(config.train), 8,
                            parallel.make_mesh(config, jax.devices()[:1]))
    checkpoints = Checkpointer(trained / "checkpoints", config.checkpoint)
    whole, _ = checkpoints.restore(checkpoints.latest_step(), target, config)
    checkpoints.close()
    assert int(state.step) == int(whole.step) == 3
    jax.tree.map(np.testing.assert_array_equal, state.params, whole.params)
    jax.tree.map(np.testing.assert_array_equal, jax.random.key_data(state.rng),
                 jax.random.key_data(whole.rng))


def test_generate_streams_a_completion_with_a_forced_instant_thought(trained, capsys):
    assert main(["generate", str(trained), "--prompt", "12+7=?", "--effort", "instant",
                 "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Q: 12+7=?\n<think></think>")


def test_eval_reports_accuracy_and_the_sweep_writes_its_table_and_plot(trained, capsys):
    assert main(["eval", str(trained), "--problems", "4", "--max-new-tokens", "6"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["accuracy"] <= 1 and result["completion_tokens"] <= 6
    assert main(["eval", str(trained), "--sweep", "--problems", "2", "--budgets", "0,2",
                 "--votes-list", "1,2", "--max-new-tokens", "6"]) == 0
    rows = json.loads((trained / "sweep" / "sweep.json").read_text())
    assert [(r["budget"], r["votes"]) for r in rows] == [(0, 1), (0, 2), (2, 1), (2, 2)]
    assert all(r["thinking_tokens"] <= r["budget"] for r in rows)
    assert (trained / "sweep" / "sweep.png").stat().st_size > 0


def test_eval_of_a_directory_without_a_run_fails_clearly(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "config.json does not exist" in capsys.readouterr().err


def test_eval_control_sweeps_the_effort_tokens_unforced(trained, capsys):
    assert main(["eval", str(trained), "--control", "--problems", "2",
                 "--max-new-tokens", "6"]) == 0
    rows = json.loads((trained / "sweep" / "control.json").read_text())
    assert [r["effort"] for r in rows] == list(config_lib.EFFORT_LEVELS)
    assert all(r["budget"] == 6 and 0 <= r["thinking_tokens"] <= 6 for r in rows)
    assert (trained / "sweep" / "control.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["generate", "W", "--prompt", "x", "--temperature", "-1"],
     "argument --temperature: must be >= 0, got -1"),
    (["generate", "W", "--prompt", "x", "--top-p", "2"], "argument --top-p: must lie in (0, 1]"),
    (["generate", "W", "--prompt", "x", "--top-k", "0"], "argument --top-k: must be >= 1"),
    (["generate", "W", "--prompt", "x", "--max-new-tokens", "-3"],
     "argument --max-new-tokens: must be >= 1, got -3"),
    (["eval", "W", "--problems", "0"], "argument --problems: must be >= 1, got 0"),
    (["eval", "W", "--votes", "zero"], "argument --votes: invalid int value: 'zero'"),
    (["eval", "W", "--votes-list", "1,a"], "argument --votes-list: invalid comma-separated"),
])
def test_bad_sampling_options_exit_with_2_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_sweep_budgets_exit_with_2_naming_them(trained, capsys):
    assert main(["eval", str(trained), "--sweep", "--problems", "1", "--budgets", "a,b"]) == 2
    assert "--budgets: expected comma-separated integers, got 'a,b'" in capsys.readouterr().err


def test_tools_on_a_vocabulary_without_their_tokens_are_refused_before_sampling():
    no_tools = types.SimpleNamespace(special={"<bos>": 1})
    args = types.SimpleNamespace(tools="calc", effort=None)
    with pytest.raises(config_lib.ConfigError, match="^--tools: the vocabulary has no <tool>"):
        _toolbox(args, no_tools)


def test_the_streamed_text_is_the_decoded_completion():
    """Characters split over several byte tokens show once whole; a tokenizer that drops a
    text's leading space keeps the space between prompt and completion."""
    tokenizer = ByteTokenizer()
    prompt, completion = tokenizer.encode("x="), tokenizer.encode("1517 \u2713 caf\u00e9")
    pieces = list(_growing_text(tokenizer, prompt, completion))
    assert "".join(pieces) == "1517 \u2713 caf\u00e9"
    assert not any("\ufffd" in piece for piece in pieces)

    class Words:  # decodes as SentencePiece does: the text's first space is dropped
        words = ["The", " capital", " is", " Paris"]

        def decode(self, ids):
            return "".join(self.words[i] for i in ids).lstrip()

    assert list(_growing_text(Words(), [0, 1, 2], [3])) == [" Paris"]
