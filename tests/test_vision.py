"""Early-fusion images in the model: patches, where each `<patch>` token's patch comes from,
the patch embedding against a loop, what the image changes and what it cannot, gradients,
the train, eval and GRPO steps (sharded against one device), and decoding after an image
prompt against full recompute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from helpers import abstract_params, loss_and_grads, tiny_model
from test_infer import cached_and_full_logits, random_variables, right_padded
from test_rl_step import LEARNING_RATE, random_state
from jaxllm import Config, MeshConfig, parallel
from jaxllm.config import GRPOConfig, VisionConfig
from jaxllm.convert.hf_config import ConversionError, check_exportable
from jaxllm.infer import generate, left_pad
from jaxllm.nn import PatchEmbed, Transformer, patch_layout, patchify, pixel_patches, unpatchify
from jaxllm.rl.step import batch_keys, jit_grpo_step, jit_logprobs, token_logprobs
from jaxllm.train.evaluate import eval_sums
from jaxllm.train.loop import context_ordered

VISION = VisionConfig(image_size=4, patch_size=2, channels=3)  # 2 x 2 patches of 12 values
GRID, WIDTH = VISION.grid, VISION.patch_dim
OPEN, CLOSE, PATCH = 271, 272, VISION.patch_token_id  # <image>, </image>, <patch>
IMAGE = [OPEN] + [PATCH] * GRID**2 + [CLOSE]
SMALL = dict(num_layers=1, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64)
MODEL = Transformer(tiny_model(vision=VISION, **SMALL))


def text_and_images(seed: int, runs: tuple[int, ...]) -> list[int]:
    """Random text runs of the lengths `runs`, with an image between consecutive runs."""
    rng = np.random.default_rng(seed)
    row = []
    for i, length in enumerate(runs):
        row += (IMAGE if i else []) + rng.integers(0, 256, length).tolist()
    return row


def random_patches(seed: int, rows: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(rows, count, WIDTH)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Patches and their layout


def test_patchify_cuts_row_major_patches_each_flattened_y_x_c():
    image = np.arange(32, dtype=np.float32).reshape(4, 4, 2)  # value = 8 y + 2 x + c
    want = np.array([
        [0, 1, 2, 3, 8, 9, 10, 11],  # top left: (0,0), (0,1), (1,0), (1,1), 2 channels each
        [4, 5, 6, 7, 12, 13, 14, 15],  # top right
        [16, 17, 18, 19, 24, 25, 26, 27],  # bottom left
        [20, 21, 22, 23, 28, 29, 30, 31],  # bottom right
    ], np.float32)
    np.testing.assert_array_equal(patchify(image, 2), want)


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
def test_unpatchify_inverts_patchify(xp):
    image = xp.asarray(np.random.default_rng(0).uniform(size=(8, 8, 3)).astype(np.float32))
    patches = patchify(image, 4)
    assert patches.shape == (4, 48) and isinstance(patches, type(image))
    back = unpatchify(patches, image_size=8, patch_size=4, channels=3)
    np.testing.assert_array_equal(back, image)


def test_pixel_patches_are_the_patches_of_the_image_in_0_1():
    image = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    got = pixel_patches(image, 2)
    assert got.dtype == np.float32 and got.max() <= 1
    np.testing.assert_array_equal(got, patchify(image.astype(np.float32) / 255, 2))


def test_patch_layout_of_two_images_and_text_in_a_packed_row():
    p, t = 9, 5  # a patch token, a text token
    tokens = jnp.array([[t, p, p, p, p, t, t, p, p, p, p, t],
                        [p, p, p, p, t, t, t, t, t, t, t, t]])
    index, row, col = patch_layout(tokens, p, grid=2)
    n = -1
    np.testing.assert_array_equal(index, [[n, 0, 1, 2, 3, n, n, 4, 5, 6, 7, n],
                                          [0, 1, 2, 3, n, n, n, n, n, n, n, n]])
    np.testing.assert_array_equal(row, [[n, 0, 0, 1, 1, n, n, 0, 0, 1, 1, n],
                                        [0, 0, 1, 1, n, n, n, n, n, n, n, n]])
    np.testing.assert_array_equal(col, [[n, 0, 1, 0, 1, n, n, 0, 1, 0, 1, n],
                                        [0, 1, 0, 1, n, n, n, n, n, n, n, n]])


def test_patch_embed_equals_a_loop_over_the_tokens():
    tokens = np.array([text_and_images(0, (2, 1, 3)), text_and_images(1, (5, 0, 1))])
    patches = random_patches(0, 2, 2 * GRID**2)
    module = PatchEmbed(VISION, 16)
    params = nn.meta.unbox(module.init(jax.random.key(0), tokens, patches))["params"]
    embeddings, mask = module.apply({"params": params}, tokens, patches)
    want = np.zeros(embeddings.shape, np.float32)
    for b, row in enumerate(tokens):
        k = 0
        for s, token in enumerate(row):
            if token == PATCH:
                r, c = divmod(k % GRID**2, GRID)
                want[b, s] = (patches[b, k] @ params["proj"]["kernel"] + params["proj"]["bias"]
                              + params["row"][r] + params["col"][c])
                k += 1
    np.testing.assert_array_equal(mask, tokens == PATCH)
    np.testing.assert_allclose(embeddings, want, atol=1e-6)


def test_patches_of_the_wrong_width_name_the_expected_shape():
    tokens = jnp.array([text_and_images(0, (1, 1))])
    with pytest.raises(ValueError, match=r"expected shape \[1, P, 12\].*got \(1, 4, 11\)"):
        MODEL.init(jax.random.key(0), tokens, patches=jnp.zeros((1, 4, 11)))


# ---------------------------------------------------------------------------------------
# The model


@pytest.fixture(scope="module")
def params():
    return random_variables(MODEL)["params"]


def test_the_image_changes_the_text_after_it_and_not_before(params):
    tokens = jnp.array([text_and_images(0, (3, 3))])  # image span at 3 .. 8
    patches = random_patches(0, 1, GRID**2)
    apply = jax.jit(lambda x: MODEL.apply({"params": params}, tokens, patches=x))
    logits = apply(patches)
    for other in (patches[:, ::-1], random_patches(1, 1, GRID**2)):  # permuted, another image
        changed = apply(other)
        np.testing.assert_allclose(changed[:, :4], logits[:, :4], atol=1e-6)
        assert np.all(np.abs(changed[:, 9:] - logits[:, 9:]).max(axis=-1) > 1e-4)


def test_a_text_only_model_is_the_model_without_images(params):
    text = Transformer(tiny_model(vision=VisionConfig(image_size=0, patch_size=2), **SMALL))
    shapes = abstract_params(text)
    assert shapes.keys() == {"embedding", "decoder", "final_norm", "head"}
    assert shapes == abstract_params(Transformer(tiny_model(**SMALL)))
    tokens = jnp.array([text_and_images(0, (3, 3))])
    shared = {k: v for k, v in params.items() if k != "patch_embed"}
    logits = jax.jit(lambda model, p: model.apply({"params": p}, tokens), static_argnums=0)
    np.testing.assert_array_equal(logits(MODEL, params), logits(text, shared))
    with pytest.raises(ValueError, match="model.vision.image_size"):
        text.apply({"params": shared}, tokens, patches=random_patches(0, 1, GRID**2))


def test_the_patch_embedding_learns_from_text_after_the_image_only(params):
    tokens = jnp.array([text_and_images(0, (3, 3))])
    patches = random_patches(0, 1, GRID**2)

    def losses(p):  # next-token log-likelihoods after the image (9) and before it (2)
        logits = MODEL.apply({"params": p}, tokens, patches=patches)
        return jnp.stack([jax.nn.log_softmax(logits[0, t])[tokens[0, t + 1]] for t in (9, 2)])

    grads = jax.jit(jax.jacrev(losses))(params)["patch_embed"]
    after, before = jax.tree.map(lambda g: g[0], grads), jax.tree.map(lambda g: g[1], grads)
    for name, grad in jax.tree_util.tree_leaves_with_path(after):
        assert np.all(np.abs(grad).reshape(grad.shape[0], -1).max(-1) > 0), name
    for grad in jax.tree.leaves(before):
        np.testing.assert_array_equal(grad, 0)


# ---------------------------------------------------------------------------------------
# Training and evaluation steps, sharded


def image_batch() -> dict:
    """4 packed rows of 16 tokens, each with two images, and their 8 patches a row."""
    rows = np.array([text_and_images(seed, (2, 2, 1)) for seed in range(4)])  # [4, 17]
    inputs, targets = rows[:, :-1], rows[:, 1:]
    return {
        "inputs": jnp.asarray(inputs, jnp.int32), "targets": jnp.asarray(targets, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(16), (4, 16)),
        "segment_ids": jnp.ones((4, 16), jnp.int32),
        "loss_mask": jnp.asarray(targets != PATCH, jnp.float32),
        "patches": jnp.asarray(random_patches(0, 4, 2 * GRID**2)),
    }


def test_sharded_loss_and_gradients_with_images_match_one_device(params):
    batch = image_batch()
    one = parallel.make_mesh(Config(), devices=jax.devices()[:1])
    want_loss, want_grads, _ = loss_and_grads(MODEL, params, batch, one)
    nll, tokens = jax.jit(lambda p, b: eval_sums(p, {}, b, model=MODEL))(params, batch)
    np.testing.assert_allclose(nll / tokens, want_loss, rtol=1e-6)
    assert all(np.any(g != 0) for g in jax.tree.leaves(want_grads["patch_embed"]))
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=2, fsdp=2, tensor=2)))
    loss, grads, placed = loss_and_grads(MODEL, params, batch, mesh)
    assert placed["patch_embed"]["proj"]["kernel"].sharding.spec == P(None, parallel.FSDP)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5),
                 grads, want_grads)


@pytest.mark.parametrize("order", ["zigzag", "striped"])
def test_context_parallel_loss_and_gradients_with_images_match_one_device(params, order):
    """data=2 x context=2 x tensor=2 through the loop's data path: the tokens move into
    context order while the patches stay in row order, found through `patch_index`."""
    batch = image_batch()
    one = parallel.make_mesh(Config(), devices=jax.devices()[:1])
    want_loss, want_grads, _ = loss_and_grads(MODEL, params, batch, one)
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=2, context=2, tensor=2)))
    host = jax.tree.map(np.asarray, batch)
    (ordered,) = context_ordered([host], mesh, order, patch_token_id=PATCH)
    np.testing.assert_array_equal(ordered["patches"], host["patches"])
    assert not np.array_equal(ordered["inputs"], host["inputs"])
    loss, grads, _ = loss_and_grads(MODEL, params, ordered, mesh)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5),
                 grads, want_grads)


def test_the_grpo_log_probs_and_step_read_the_images():
    batch = image_batch()
    mesh, tx, state, shardings = random_state(MODEL, MeshConfig(data=1), jax.devices()[:1])
    sequences = (batch["inputs"], batch["positions"], batch["segment_ids"], batch["patches"])
    with parallel.use_mesh(mesh):
        logprobs = jit_logprobs(MODEL, mesh, shardings, images=True)
        logp = logprobs(state.params, state.moe_bias, *sequences)
        logits = jax.jit(MODEL.apply)({"params": state.params}, *sequences)
        np.testing.assert_allclose(logp, token_logprobs(logits, batch["inputs"])[0], atol=1e-5)
        cfg = GRPOConfig(group_size=2)
        rl_batch = dict(zip(("tokens", "positions", "segment_ids", "patches"), sequences),
                        completion_mask=batch["loss_mask"], sampler_logprobs=logp,
                        advantages=jnp.array([1.0, -1.0, 1.0, -1.0]))
        step = jit_grpo_step(MODEL, tx, cfg, optax.constant_schedule(LEARNING_RATE), mesh,
                             shardings, images=True)
        before = jax.device_get(state.params["patch_embed"])
        after, _ = step(state, {k: rl_batch[k] for k in batch_keys(cfg, images=True)})
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after.params["patch_embed"])):
        assert np.any(old != new)  # the patch embedding took a gradient step


# ---------------------------------------------------------------------------------------
# Decoding after an image prompt

PROMPTS = [text_and_images(0, (2, 1)), text_and_images(1, (3,)), text_and_images(2, (0, 2))]


def test_cached_decode_after_an_image_prompt_matches_full_recompute(params):
    variables = {"params": params}
    steps = 4
    continuation = np.asarray(jax.random.randint(jax.random.key(2), (3, steps), 0, 256))
    rows = [p + list(c) for p, c in zip(PROMPTS, continuation)]
    tokens, lengths = left_pad(PROMPTS, pad_id=0)
    patches = random_patches(0, 3, GRID**2)
    cached, full = cached_and_full_logits(MODEL, variables, tokens, lengths, continuation,
                                          right_padded(rows, max(map(len, rows))), patches)
    want = np.stack([full[np.arange(3), lengths + i - 1] for i in range(steps)])
    np.testing.assert_allclose(cached, want, atol=1e-5)


def test_generate_reads_the_prompts_images(params):
    variables = {"params": params}
    patches = random_patches(0, 3, GRID**2)
    result = generate(MODEL, variables["params"], PROMPTS, max_new_tokens=2, temperature=0,
                      patches=patches)
    lengths = np.array([len(p) for p in PROMPTS])
    full = MODEL.apply(variables, right_padded(PROMPTS, lengths.max()), patches=patches)
    last = jax.nn.log_softmax(full[np.arange(3), lengths - 1])
    np.testing.assert_array_equal(result.tokens[:, 0], np.argmax(last, -1))
    np.testing.assert_allclose(result.logprobs[:, 0], np.max(last, -1), atol=1e-5)


def test_an_early_fusion_model_is_not_exported_as_a_text_family():
    with pytest.raises(ConversionError, match="early-fusion model cannot be exported"):
        check_exportable(tiny_model(vision=VISION), "llama")
    check_exportable(tiny_model(), "llama")
