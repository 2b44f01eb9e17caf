"""DPO: the losses against NumPy, preference pairs and their errors, and the phase end to end
(learning a preference, the cached reference, resuming)."""

import dataclasses
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_model
from runs import quiet
from jaxllm import config as config_lib
from jaxllm import parallel
from jaxllm.cli import main
from jaxllm.data import tasks
from jaxllm.data.readers import jsonl_records
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.nn import Transformer
from jaxllm.post import preferences
from jaxllm.post.dpo import dpo, pair_indices
from jaxllm.post.dpo_loss import dpo_loss, sequence_logps
from jaxllm.train.loop import pretrain
from jaxllm.train.scaffold import initial_weights
from jaxllm.train.optimizer import make_optimizer
from jaxllm.train.state import init_state

POLICY = np.array([-3.0, -5.5, -2.0, -7.0, -4.0, -1.5])  # 3 pairs: chosen rows, then rejected
REF = np.array([-3.5, -5.0, -2.5, -6.0, -4.5, -2.5])
LENGTHS = np.array([2, 4, 3, 5, 1, 3])


def log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def reference_loss(policy, ref, lengths, beta, loss, eps):
    """The losses transcribed from the papers (TRL's normalisation for IPO)."""
    if loss == "ipo":
        policy, ref = policy / lengths, ref / lengths
    h = (policy[:3] - ref[:3]) - (policy[3:] - ref[3:])
    if loss == "ipo":
        return np.mean((h - 1 / (2 * beta)) ** 2)
    return np.mean(-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h))


CASES = [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)]


@pytest.mark.parametrize("loss,eps", CASES)
def test_the_losses_match_their_formulas(loss, eps):
    cfg = config_lib.DPOConfig(paths="p.jsonl", beta=0.5, loss=loss, label_smoothing=eps)
    value, metrics = dpo_loss(jnp.asarray(POLICY), jnp.asarray(REF), jnp.asarray(LENGTHS), cfg)
    np.testing.assert_allclose(value, reference_loss(POLICY, REF, LENGTHS, 0.5, loss, eps),
                               rtol=1e-6)
    rewards = 0.5 * (POLICY - REF) / (LENGTHS if loss == "ipo" else 1)
    chosen, rejected = rewards[:3], rewards[3:]
    np.testing.assert_allclose(metrics["rewards/chosen"], chosen.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margins"], (chosen - rejected).mean(), rtol=1e-6)
    assert metrics["rewards/accuracies"] == np.mean(chosen > rejected)


@pytest.mark.parametrize("loss,eps", CASES)
def test_gradients_reach_the_policy_only(loss, eps):
    cfg = config_lib.DPOConfig(paths="p.jsonl", beta=0.5, loss=loss, label_smoothing=eps)
    policy, ref, lengths = (jnp.asarray(x, jnp.float32) for x in (POLICY, REF, LENGTHS))
    grad_policy, grad_ref = jax.grad(lambda p, r: dpo_loss(p, r, lengths, cfg)[0],
                                     argnums=(0, 1))(policy, ref)
    np.testing.assert_array_equal(grad_ref, 0.0)
    step = 1e-3  # central differences of the NumPy transcription, in float64
    for i in range(len(POLICY)):
        up, down = POLICY.copy(), POLICY.copy()
        up[i] += step
        down[i] -= step
        numeric = (reference_loss(up, REF, LENGTHS, 0.5, loss, eps)
                   - reference_loss(down, REF, LENGTHS, 0.5, loss, eps)) / (2 * step)
        np.testing.assert_allclose(grad_policy[i], numeric, rtol=1e-3, atol=1e-6)


def test_sequence_logps_sum_the_response_tokens():
    token_logps = jnp.array([[0.0, -1.0, -2.0, -4.0], [0.0, -0.5, -0.25, -8.0]])
    mask = jnp.array([[0, 0, 1, 1], [0, 1, 1, 0]])
    np.testing.assert_allclose(sequence_logps(token_logps, mask), [-6.0, -0.75])


@pytest.mark.parametrize("override,message", [
    ("dpo.paths=", "dpo.paths: name the JSONL files of pairs"),
    ("dpo.beta=0", "dpo.beta: must be positive, got 0.0"),
    ("dpo.label_smoothing=0.5", "dpo.label_smoothing: must lie in [0, 0.5), got 0.5"),
    ("dpo.loss=ipo", "dpo.label_smoothing: smooths the sigmoid loss only"),
    ("train.batch_size=15", "train.batch_size: a DPO batch is a chosen and a rejected row"),
])
def test_bad_dpo_settings_are_named(override, message):
    config = config_lib.Config(dpo=config_lib.DPOConfig(paths="p.jsonl", label_smoothing=0.1))
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.apply_overrides(config, [override])
    assert str(error.value).startswith(message)


def test_a_batch_is_chosen_rows_then_rejected_rows_with_the_response_masked():
    tokenizer = ByteTokenizer()
    pairs = [preferences.tokenize(preferences.Pair("Q: 1+1=?\n", "2", "11"), tokenizer, 16),
             preferences.tokenize(preferences.Pair("", "ab", "c"), tokenizer, 4)]
    rows = preferences.batch(pairs, seq_len=16, pad_id=tokenizer.pad_id)
    assert rows["tokens"].shape == (4, 16)
    prompt = [tokenizer.bos_id, *tokenizer.encode("Q: 1+1=?\n")]
    expected = prompt + [ord("2"), tokenizer.eos_id]
    np.testing.assert_array_equal(rows["tokens"][0, :len(expected)], expected)
    np.testing.assert_array_equal(np.flatnonzero(rows["response_mask"][0]),
                                  [len(prompt), len(prompt) + 1])
    np.testing.assert_array_equal(rows["tokens"][2, len(prompt):len(prompt) + 3],
                                  [ord("1"), ord("1"), tokenizer.eos_id])
    np.testing.assert_array_equal(rows["segment_ids"][3], [1] * 3 + [0] * 13)
    np.testing.assert_array_equal(rows["positions"][3, :4], [0, 1, 2, 0])
    cut = preferences.batch(pairs[1:], seq_len=3, pad_id=tokenizer.pad_id)  # loses the <eos>
    np.testing.assert_array_equal(cut["tokens"][0], [tokenizer.bos_id, ord("a"), ord("b")])
    np.testing.assert_array_equal(cut["response_mask"][0], [0, 1, 1])


def test_pairs_of_a_step_cover_each_epoch_once():
    steps = [pair_indices(step, 4, 10, seed=0) for step in range(1, 6)]
    flat = np.concatenate(steps)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert list(flat[:10]) != list(flat[10:20])  # each epoch in its own order


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"', "pairs.jsonl:2 is not JSON"),
    ('["a", "b", "c"]', "pairs.jsonl:2 is not a JSON object"),
    ('{"prompt": "a", "chosen": "b"}', "pairs.jsonl:2 has no string 'rejected'"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "pairs.jsonl:2 has an empty 'chosen'"),
    ('{"prompt": "a", "chosen": "b", "rejected": " "}', "pairs.jsonl:2 has an empty 'rejected'"),
])
def test_a_bad_pair_is_named_by_file_and_line_and_nothing_is_written(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' + line + "\n")
    config = toy_config(tmp_path / "run", paths=str(path), steps=2)
    with pytest.raises(config_lib.ConfigError, match="dpo.paths: .*" + message):
        dpo(config, log=quiet)
    assert not (tmp_path / "run").exists()


def test_a_line_separator_inside_a_string_stays_in_its_record(tmp_path):
    """JSON allows U+2028 raw in a string; only a newline ends a JSONL record."""
    path = tmp_path / "pairs.jsonl"
    record = {"prompt": "a\u2028b", "chosen": "c\u2029", "rejected": "d\u0085e"}
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    [pair] = preferences.read_pairs(str(path), "dpo.paths")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("a\u2028b", "c\u2029", "d\u0085e")
    assert list(jsonl_records(path)) == [(1, record)]


def test_the_command_refuses_an_empty_response_with_status_2(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "", "rejected": "c"}\n')
    experiment = tmp_path / "experiment.py"
    experiment.write_text("from jaxllm.config import Config, DPOConfig\n\n"
                          "def config():\n"
                          f"    return Config(dpo=DPOConfig(paths={str(pairs)!r}))\n")
    assert main(["dpo", str(experiment), f"workdir={tmp_path / 'run'}"]) == 2
    assert f"dpo.paths: {pairs}:1 has an empty 'chosen'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_prompt_without_room_for_a_response_is_refused():
    pair = preferences.Pair("x" * 20, "a", "b", where="dpo.paths: p.jsonl:7")
    with pytest.raises(config_lib.ConfigError, match="p.jsonl:7: the prompt's 21 tokens"):
        preferences.tokenize(pair, ByteTokenizer(), seq_len=16)


def arithmetic_pairs(path, count: int, seed: int) -> str:
    """Arithmetic problems with a positive answer, chosen, and its negation, rejected."""
    rng, lines = np.random.default_rng(seed), []
    while len(lines) < count:
        problem = tasks.generate("arithmetic", rng, difficulty=1)
        if int(problem.answer) > 0:
            lines.append(json.dumps({"prompt": tasks.prompt(problem), "chosen": problem.answer,
                                     "rejected": f"-{problem.answer}"}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def toy_config(workdir, *, paths: str, steps: int, eval_paths: str | None = None,
               reference: str = "batch") -> config_lib.Config:
    return config_lib.Config(
        model=tiny_model(vocab_size=ByteTokenizer().vocab_size, embed_dim=32, num_layers=1,
                         num_heads=4, num_kv_heads=2, mlp_dim=64),
        mesh=config_lib.MeshConfig(data=8),
        train=config_lib.TrainConfig(steps=steps, batch_size=16, seq_len=24, learning_rate=3e-3,
                                     warmup_steps=0, weight_decay=0.0, log_every=1),
        dpo=config_lib.DPOConfig(paths=paths, eval_paths=eval_paths, eval_every=1,
                                 reference=reference),
        checkpoint=config_lib.CheckpointConfig(every=100),
        workdir=str(workdir),
    )


@pytest.mark.slow
def test_dpo_learns_a_preference_and_the_cached_reference_resumes_identically(tmp_path):
    paths = arithmetic_pairs(tmp_path / "train.jsonl", 96, seed=0)
    eval_paths = arithmetic_pairs(tmp_path / "eval.jsonl", 24, seed=1)
    history = dpo(toy_config(tmp_path / "batch", paths=paths, eval_paths=eval_paths, steps=8),
                  log=quiet)
    first, last = history[0], history[-1]
    assert last["eval/rewards/margins"] > first["eval/rewards/margins"] > 0
    assert last["eval/rewards/accuracies"] >= 0.9, history
    assert last["eval/logps/chosen"] - last["eval/logps/rejected"] > (
        first["eval/logps/chosen"] - first["eval/logps/rejected"])

    # The same run with the reference's log-probs cached, stopped after step 3 and resumed:
    # the cache is read back, not written again, and the losses are those of the first run.
    config = toy_config(tmp_path / "cached", paths=paths, eval_paths=eval_paths, steps=8,
                        reference="cached")
    stopped = dpo(config, log=quiet, stop_after=3)
    cache = tmp_path / "cached" / "reference_logps.json"
    written = cache.stat().st_mtime_ns
    resumed = dpo(config, log=quiet)
    assert cache.stat().st_mtime_ns == written
    assert [r["step"] for r in stopped + resumed] == list(range(1, 9))
    for key in ("loss", "eval/loss", "rewards/margins"):
        np.testing.assert_allclose([r[key] for r in stopped + resumed],
                                   [r[key] for r in history], rtol=1e-4, atol=1e-6)


def test_a_resumed_run_makes_its_reference_from_the_seed_again(tmp_path):
    """Without init_from, the reference of a resumed run is the seeded initialisation, not
    the trained weights it resumes with."""
    config = toy_config(tmp_path, paths="p.jsonl", steps=2)
    model, tx = Transformer(config.model), make_optimizer(config.train)
    mesh = parallel.make_mesh(config)
    start, _ = init_state(model, tx, config.train.seq_len, mesh, jax.random.key(config.train.seed))
    trained = start.replace(params=jax.tree.map(lambda x: x + 1, start.params))
    run = SimpleNamespace(config=config, start=3, state=trained, model=model, tx=tx, mesh=mesh)
    params, _ = initial_weights(run)
    jax.tree.map(np.testing.assert_array_equal, params, start.params)


@pytest.mark.slow
def test_a_run_from_init_from_resumes_with_that_reference_loaded_again(tmp_path):
    """Stopped after step 1 and resumed, a DPO run from another run's weights gives the
    losses of an uninterrupted one: the reference is read into a copy, not into the live
    state that a restore frees."""
    pre = toy_config(tmp_path / "pre", paths="", steps=1)
    pretrain(dataclasses.replace(pre, dpo=None, data=config_lib.DataConfig(source="arithmetic")),
             log=quiet)
    paths = arithmetic_pairs(tmp_path / "train.jsonl", 48, seed=0)

    def config(name):
        return dataclasses.replace(toy_config(tmp_path / name, paths=paths, steps=3),
                                   init_from=str(tmp_path / "pre"))

    whole = dpo(config("whole"), log=quiet)
    stopped = dpo(config("parts"), log=quiet, stop_after=1)
    resumed = dpo(config("parts"), log=quiet)
    np.testing.assert_allclose([r["loss"] for r in stopped + resumed],
                               [r["loss"] for r in whole], rtol=1e-5)
