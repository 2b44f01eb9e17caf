"""Tools inside the thinking: strict calls, limits, the pausing generation loop, GRPO's
masks and counts, the tool corpus and `jaxllm generate --tools`."""

import collections
import re
import time
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tool_functions
from helpers import init_params, tiny_model
from jaxllm import cli
from jaxllm import config as config_lib
from jaxllm.data import tasks
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.infer import Sampler, generate
from jaxllm.infer.tool_use import (
    ToolSampler, ToolTokens, generate_with_tools, result_tokens, run_call,
)
from jaxllm.nn import Transformer
from jaxllm.rl.loop import format_line, grpo
from jaxllm.rl.rollout import prompt_tokens, rollout
from jaxllm.rl.verify import is_correct
from jaxllm.tools import Tool, Toolbox, calc, countdown, parse_call, toolbox

TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def box():
    tools = [Tool("calc", calc), Tool("countdown", countdown)] + [
        Tool(name, getattr(tool_functions, name), timeout_s=TIMEOUT_S)
        for name in ("sleep_forever", "spin", "power", "huge_output", "crash", "inject")
    ]
    with Toolbox(tools) as box:
        assert box.call("calc: 1") == "1"  # the worker starts outside the timed tests
        yield box


def test_tool_calls_parse_strictly():
    assert parse_call("calc: 37*41") == ("calc", "37*41")
    assert parse_call("calc:37*41") == ("calc", "37*41")
    assert parse_call("my_tool2: a: b") == ("my_tool2", "a: b")
    for bad in ("calc 37*41", " calc: 1", "Calc: 1", "2calc: 1", "ca-lc: 1", ": 1", "",
                "x" * 33 + ": 1", "calc\n: 1"):
        assert parse_call(bad) is None, bad


def test_calc_is_exact_and_countdown_agrees_with_the_verifier():
    cases = {"37*41": Fraction(37 * 41), "7/2": Fraction(7, 2), "(1+2)*3-10": Fraction(-1),
             "1/3+1/6": Fraction(1, 2), "999999999999999999*999999999999999999":
             Fraction(999999999999999999**2)}
    for expression, value in cases.items():
        assert Fraction(calc(expression)) == value
    assert calc("1/0").startswith("error:")
    for expression in ("(2+3)*4", "2*3+4", "(2+3)*5", "4*5"):
        verdict = countdown(f"make 20 from 2,3,4 by {expression}")
        assert (verdict == "yes") == is_correct("countdown", expression, "", (2, 3, 4), 20)
    assert countdown("make 20 from 2,3,4 by 4*5") == "no: it uses 4,5"
    assert countdown("make 20 from 2,3,4 by 2*3+4") == "no: it makes 10"
    assert countdown("20 from 2,3,4 by 4*5").startswith("error:")


@pytest.mark.parametrize("call", [
    "calc: __import__('os').system('touch {marker}')",
    "calc: open('{marker}', 'w')",
    "calc: 9**9**9",
    "calc: " + "9" * 1_000_000,
    "calc: 1" + "*999999999999999999" * 20,
    "nope: 1",
    "sleep_forever: 1",
    "spin: 1",
    "power: 9",
    "huge_output: 1",
    "crash: 1",
    "__import__('os').system('touch {marker}')",
])
def test_malicious_calls_return_an_error_within_the_limit_and_run_no_code(box, call, tmp_path):
    marker = tmp_path / "ran"
    started = time.perf_counter()
    output = box.call(call.format(marker=marker))
    assert time.perf_counter() - started < TIMEOUT_S + 1.0
    assert output.startswith("error:") and len(output) < 200
    assert not marker.exists()
    assert box.call("calc: 37*41") == "1517"  # a killed worker is replaced


def test_user_tools_are_named_strictly_and_must_pickle():
    with pytest.raises(ValueError, match="name"):
        Tool("Bad name", tool_functions.crash)
    with pytest.raises(ValueError, match="picklable"):
        Toolbox([Tool("anon", lambda args: args)])
    with pytest.raises(ValueError, match="unknown"):
        toolbox(["calc", "shell"])


def test_a_call_runs_from_its_tokens_and_a_result_cannot_inject_control_tokens(box):
    tokenizer = ByteTokenizer()
    marks = ToolTokens.from_tokenizer(tokenizer)
    generated = tokenizer.encode("12<tool>x</tool>ab<tool>calc: 37*41</tool>")
    limits = dict(calls_before=0, max_calls=2)
    assert run_call(box, tokenizer, generated, marks, **limits) == ("calc: 37*41", "1517")
    unopened = tokenizer.encode("<tool>calc: 1</tool>calc: 2</tool>")
    assert run_call(box, tokenizer, unopened, marks, **limits)[1].startswith("error:")
    assert result_tokens("1517", tokenizer, marks) == tokenizer.encode("<result>1517</result>")
    injected = result_tokens(box.call("inject: 1"), tokenizer, marks)
    assert [t in marks.special for t in injected] == [True] + [False] * (len(injected) - 2) + [True]
    assert run_call(box, tokenizer, generated, marks, calls_before=2, max_calls=2)[1] == (
        "error: at most 2 tool calls")


# One shape for every generation below (4 rows, prompts padded to PROMPT_LEN + NEW, NEW
# tokens, three stop tokens), so the decode loop compiles once.
QUESTIONS = ("1+1=?", "23*4=?", "7-5=?", "make 6 from 1,2,3")
PROMPT_LEN, NEW = 16, 24


def task_prompts(tokenizer, think: bool = True) -> list[list[int]]:
    """The QUESTIONS as rollouts prompt them, or without the final `<think>` (as `generate`
    does without --effort)."""
    prompts = [prompt_tokens(tasks.Problem("arithmetic", q, "0"), tokenizer) for q in QUESTIONS]
    return prompts if think else [p[:-1] for p in prompts]


@pytest.fixture(scope="module")
def rigged():
    """A random one-layer model with `</tool>` in the head column of a token that the greedy
    continuations of some QUESTIONS use and others do not: those rows pause where the plain
    model would write that token, the others never."""
    tokenizer = ByteTokenizer()
    model = Transformer(tiny_model(vocab_size=tokenizer.vocab_size, num_layers=1))
    params = init_params(model)
    stops = (tokenizer.eos_id, tokenizer.special["</answer>"], tokenizer.special["</tool>"])
    used = [set(row.tolist()) for think in (True, False) for row in generate(
        model, params, task_prompts(tokenizer, think), max_new_tokens=NEW, temperature=0,
        stop_ids=stops, pad_id=tokenizer.pad_id, prompt_len=PROMPT_LEN + NEW).tokens]
    counts = collections.Counter(t for row in used[:4] for t in row if t < 256)
    common = next(t for t, n in counts.most_common() if n < 4 and any(t in r for r in used[4:]))
    kernel = np.array(params["head"]["kernel"])
    close = tokenizer.special["</tool>"]
    kernel[:, [close, common]] = kernel[:, [common, close]]
    return model, {**params, "head": {"kernel": jnp.asarray(kernel)}}, tokenizer


def tool_spans(tokens, tokenizer) -> np.ndarray:
    """1 on every `<result> ... </result>` span right after a `</tool>`, found by scanning
    the tokens (the model may write `<result>` itself elsewhere)."""
    special = tokenizer.special
    inside, mask, previous = False, [], None
    for token in tokens:
        inside |= previous == special["</tool>"] and token == special["<result>"]
        mask.append(int(inside))
        inside &= token != special["</result>"]
        previous = token
    return np.array(mask)


def run_tools(rigged, box, prompts):
    model, params, tokenizer = rigged
    return generate_with_tools(model, params, prompts, tokenizer=tokenizer, toolbox=box,
                               max_new_tokens=NEW, temperature=0, pad_id=tokenizer.pad_id,
                               stop_ids=(tokenizer.eos_id, tokenizer.special["</answer>"]),
                               prompt_len=PROMPT_LEN)


def test_a_paused_row_does_not_disturb_the_others_and_results_are_masked(rigged, box):
    tokenizer = rigged[2]
    marks = ToolTokens.from_tokenizer(tokenizer)
    prompts = task_prompts(tokenizer)
    batch = run_tools(rigged, box, prompts)
    calls = [len(row) for row in batch.calls]
    assert max(calls) >= 1 and min(calls) == 0, calls  # some rows pause, others do not
    for row, prompt in enumerate(prompts):
        alone = run_tools(rigged, box, [prompt] * 4)  # the same shape: no new compilation
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])
        np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[row], atol=1e-5)
        length = batch.lengths[row]
        want = tool_spans(batch.tokens[row, :length], tokenizer)
        np.testing.assert_array_equal(batch.tool_mask[row, :length], want)
        assert np.all(batch.logprobs[row, :length][want == 1] == 0)
        written = [result_tokens(c.output, tokenizer, marks) for c in batch.calls[row]]
        assert want.sum() == sum(map(len, written)) or length == NEW  # the last cut short


def test_rollout_masks_tool_results_out_of_the_loss_and_counts_them(rigged, box):
    model, params, tokenizer = rigged
    sampler = ToolSampler(model, params, tokenizer, toolbox=box)
    every = [tasks.Problem("arithmetic", q, "0") for q in QUESTIONS]
    calls = [len(row) for row in run_tools(rigged, box, task_prompts(tokenizer)).calls]
    problems = [every[np.argmax(calls)], every[np.argmin(calls)]]  # one calls, one does not
    ro = rollout(sampler, problems, group_size=2, max_new_tokens=NEW, temperature=0,
                 rng=jax.random.key(0), prompt_len=PROMPT_LEN)
    results = np.stack([tool_spans(row, tokenizer) for row in ro.tokens]).astype(bool)
    results &= ro.segment_ids.astype(bool)
    assert results.any() and not (ro.completion_mask.astype(bool) & results).any()
    assert (ro.completion_mask.sum(1) == ro.lengths - results.sum(1)).all()
    outputs = [[box.call(piece[piece.rindex("<tool>") + 6:]) if "<tool>" in piece else "error"
                for piece in c.split("</tool>")[:-1]] for c in ro.completions]
    calls = [len(row) for row in outputs]
    errors = [sum(output.startswith("error") for output in row) for row in outputs]
    assert ro.tool_metrics == pytest.approx({"tools/calls": np.mean(calls),
                                             "tools/errors": np.mean(errors),
                                             "tools/result_tokens": results.sum(1).mean()})


def test_generate_command_streams_the_calls_and_results_of_the_batched_loop(
        rigged, box, capsys, monkeypatch):
    model, params, tokenizer = rigged
    prompts = task_prompts(tokenizer, think=False)
    row = int(np.argmax([len(calls) for calls in run_tools(rigged, box, prompts).calls]))
    want = run_tools(rigged, box, [prompts[row]] * 4)
    monkeypatch.setattr(cli, "_sampler", lambda workdir: (None, Sampler(model, params, tokenizer)))
    assert cli.main(["generate", "run", "--prompt", QUESTIONS[row], "--tools", "calc",
                     "--max-new-tokens", str(NEW), "--temperature", "0"]) == 0
    shown = capsys.readouterr().out
    assert want.calls[0] and "</tool><result>error: " in shown
    completion = list(want.tokens[0, :want.lengths[0]])
    assert shown == tokenizer.decode(prompts[row][1:] + completion) + "\n"
    assert cli.main(["generate", "run", "--prompt", "x", "--tools", "shell"]) == 2
    assert "--tools: unknown ['shell']" in capsys.readouterr().err


@pytest.mark.parametrize("family", tasks.TOOL_FAMILIES)
def test_tool_documents_hold_the_tools_exact_results(box, family):
    rng = np.random.default_rng(0)
    for _ in range(20):
        problem = tasks.generate(family, rng)
        document = tasks.tool_document(problem)
        call, result = re.search(r"<tool>(.*)</tool><result>(.*)</result>", document).groups()
        assert box.call(call) == result and not result.startswith("error")
        assert document == tasks.tool_document(problem)
        assert document.startswith(tasks.prompt(problem) + "<think>")
        assert document.endswith(f"</think><answer>{problem.answer}</answer>")
    with pytest.raises(ValueError, match="no tool"):
        tasks.tool_document(tasks.generate("linear", rng))


def test_tool_config_fields_are_checked():
    grpo = config_lib.Config(grpo=config_lib.GRPOConfig())
    assert config_lib.apply_overrides(grpo, ["grpo.tools=calc, countdown"]).grpo.tool_names == (
        "calc", "countdown")
    with pytest.raises(config_lib.ConfigError, match="grpo.tools"):
        config_lib.apply_overrides(grpo, ["grpo.tools=calc,shell"])
    with pytest.raises(config_lib.ConfigError, match="data.tool_documents"):
        config_lib.apply_overrides(grpo, ["data.train_size=10", "data.tool_documents=11"])


def test_the_progress_line_shows_the_tool_counts():
    record = {"step": 3, "reward": 0.5, "completion_length": 7.0, "rollout_s": 1.0,
              "update_s": 1.0, "tools/calls": 1.5, "tools/errors": 0.25}
    assert "| len 7.0 | tool calls 1.50 (0.25 errors) |" in format_line(record, 10)
    del record["tools/calls"], record["tools/errors"]
    assert "tool" not in format_line(record, 10)


@pytest.mark.slow
def test_a_grpo_step_with_tools_logs_the_tool_counts(tmp_path):
    config = config_lib.Config(
        model=tiny_model(vocab_size=ByteTokenizer().vocab_size, embed_dim=32, mlp_dim=64),
        mesh=config_lib.MeshConfig(data=2, fsdp=4),
        data=config_lib.DataConfig(source="arithmetic"),
        train=config_lib.TrainConfig(steps=1, batch_size=8, warmup_steps=0),
        grpo=config_lib.GRPOConfig(group_size=4, max_completion_len=8, eval_every=0,
                                   tools="calc"),
        workdir=str(tmp_path),
    )
    problems = [tasks.Problem("arithmetic", f"{a}+1=?", str(a + 1)) for a in range(4)]
    (record,) = grpo(config, log=lambda _: None, problems=problems)
    assert {"tools/calls", "tools/errors", "tools/result_tokens"} <= record.keys()
    assert 0 <= record["tools/errors"] <= record["tools/calls"]
