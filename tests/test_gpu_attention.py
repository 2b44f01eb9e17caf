"""The GPU kernels on CPU against the naive kernel on values and gradients: cudnn through jax's
XLA implementation of the same call, pallas_gpu in Pallas interpret mode; in whole models and
under a mesh; the layers, dtypes and lengths each refuses; and the Triton kernel lowered for
a CUDA device."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from helpers import tiny_model
from jaxllm import Config, ConfigError, MeshConfig, TrainConfig, parallel
from jaxllm import config as config_lib
from jaxllm.config import AttentionConfig
from jaxllm.nn import Mask, Transformer, alibi_slopes, attend
from jaxllm.nn.attention import Attention
from jaxllm.nn.attention_kernels import resolve_kernel
from jaxllm.nn.gpu_attention import block_sizes
from jaxllm.nn.masks import row_indices
from test_infer import random_variables
from test_mla import mla_model
from test_splash import D, assert_close, inputs, outputs_and_grads

CUDNN_CASES = {  # mask, S, kv heads, packed documents, scale
    "global_mha_packed": (Mask(), 32, 4, True, None),
    "sliding_gqa_packed": (Mask("sliding", window=5), 32, 2, True, None),
    "sliding_mqa": (Mask("sliding", window=9), 32, 1, False, 0.3),
}


@pytest.mark.parametrize("name", CUDNN_CASES)
def test_cudnn_equals_naive_on_values_and_gradients(name):
    """Off GPU the cudnn kernel is jax's XLA implementation of the same call: the causal
    flag, the window (`local_window_size=(window - 1, 0)`, keys i-window+1..i) and the
    segment mask are the kernel's, so they equal the naive kernel's masks."""
    mask, length, kv_heads, segments, scale = CUDNN_CASES[name]
    args = inputs(length, kv_heads, D, segments)
    assert_close(outputs_and_grads("cudnn", mask, *args, scale),
                 outputs_and_grads("naive", mask, *args, scale))


PALLAS_CASES = {  # S, kv heads, packed documents, scale: tiles 16, 16 and 64, 32
    "mha_packed": (32, 4, True, None),
    "gqa_packed": (48, 2, True, None),
    "mqa": (64, 1, False, 0.3),
}


@pytest.mark.parametrize("name", PALLAS_CASES)
def test_pallas_gpu_equals_naive_on_values_and_gradients(name):
    """dk and dv of the grouped heads sum over the kv head's repeated copies."""
    length, kv_heads, segments, scale = PALLAS_CASES[name]
    args = inputs(length, kv_heads, D, segments)
    assert_close(outputs_and_grads("pallas_gpu", Mask(), *args, scale),
                 outputs_and_grads("naive", Mask(), *args, scale))


def test_pallas_gpu_in_bfloat16_stays_within_bfloat16_rounding_of_float32_naive():
    """bf16 inputs: values and gradients within 3e-2 of the float32 naive kernel on the same
    (rounded) inputs of unit scale, as splash's bf16 test."""
    args = inputs(32, 2, D, segments=True)
    bf16 = [x.astype(jnp.bfloat16) for x in args[:4]]
    got = outputs_and_grads("pallas_gpu", Mask(), *bf16, args[4])
    want = outputs_and_grads("naive", Mask(), *(x.astype(jnp.float32) for x in bf16), args[4])
    assert all(x.dtype == jnp.bfloat16 for x in got)
    assert_close([x.astype(jnp.float32) for x in got], want, atol=3e-2)


def test_pallas_gpu_under_a_mesh_equals_naive_without_one():
    args = inputs(32, 2, D, segments=True)
    want = outputs_and_grads("naive", Mask(), *args)
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=2, fsdp=2, tensor=2)))
    with parallel.use_mesh(mesh):
        got = outputs_and_grads("pallas_gpu", Mask(), *args)
    assert_close(got, want)


def test_pallas_gpu_blocks_are_the_largest_powers_of_two_that_divide_the_row():
    assert [(b.block_q, b.block_k, b.block_q_dq, b.block_kv_dkv)
            for b in map(block_sizes, (4096, 96, 48))] == [
        (128, 128, 32, 32), (32, 32, 32, 32), (16, 16, 16, 16)]
    with pytest.raises(ValueError, match="length must be a multiple of 16; got 40$"):
        block_sizes(40)


@pytest.mark.parametrize("kernel, mask, message", [
    ("cudnn", Mask("chunked", chunk=8), "cudnn attention runs masks ('global', 'sliding'), "
                                        "not 'chunked'"),
    ("cudnn", Mask("strided", window=4, stride=8), "cudnn attention runs masks "
                                                   "('global', 'sliding'), not 'strided'"),
    ("pallas_gpu", Mask("sliding", window=4), "pallas_gpu attention runs masks ('global',), "
                                              "not 'sliding'"),
])
def test_gpu_kernels_refuse_masks_they_cannot_run(kernel, mask, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        attend_row(kernel, mask=mask)


@pytest.mark.parametrize("kernel", ["cudnn", "pallas_gpu"])
def test_gpu_kernels_refuse_alibi(kernel):
    with pytest.raises(ValueError, match=f"^{kernel} attention does not run ALiBi"):
        attend_row(kernel, slopes=alibi_slopes(4))


def attend_row(kernel, **kwargs):
    """`attend` over a row of 32 tokens, unjitted."""
    q, k, v, _, seg = inputs(32, 4, D, segments=False)
    idx = row_indices(seg)
    return attend(q, k, v, idx, seg, idx, seg, kernel=kernel, **kwargs)


def gpu_mesh():
    """A one-device mesh of an abstract CUDA device: traces target the GPU."""
    device = AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
    return AbstractMesh((1,), ("data",), abstract_device=device)


def test_cudnn_on_gpu_refuses_float32():
    with jax.sharding.use_abstract_mesh(gpu_mesh()):
        with pytest.raises(ValueError, match="^cudnn attention takes bfloat16 or float16 q, k "
                                             "and v, not float32$"):
            attend_row("cudnn")


def test_pallas_gpu_lowers_the_triton_kernel_for_cuda_and_auto_stays_naive():
    """The real kernel, forward and backward, not interpret mode; "auto" picks neither GPU
    kernel until a GPU run has measured them."""
    q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def loss(q, k, v, seg):
        idx = row_indices(seg)
        out = attend(q, k, v, idx, seg, idx, seg, kernel="pallas_gpu")
        return jnp.sum(out.astype(jnp.float32) ** 2)

    with jax.sharding.use_abstract_mesh(gpu_mesh()):
        assert resolve_kernel("auto", Mask()) == "naive"
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(
            lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") >= 2  # mha_forward, mha_backward


@pytest.mark.parametrize("kernel, name", [("cudnn", "gqa"), ("pallas_gpu", "mla")])
def test_gpu_kernel_model_equals_naive_model_with_the_same_params(kernel, name):
    """cudnn in GQA layers, global and sliding; pallas_gpu in global MLA layers, whose
    narrower v is padded for the GPU kernels."""
    pattern = "global,sliding" if kernel == "cudnn" else "global"
    if name == "gqa":
        cfg = tiny_model(attention=AttentionConfig(pattern=pattern, window=5, kernel="naive"))
    else:
        cfg = mla_model()
        cfg = dataclasses.replace(cfg, attention=dataclasses.replace(
            cfg.attention, pattern=pattern, kernel="naive"))
    gpu_cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention,
                                                                     kernel=kernel))
    naive, gpu = Transformer(cfg), Transformer(gpu_cfg)
    variables = random_variables(naive)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 384, (2, 32)), jnp.int32)
    segments = inputs(32, 1, D, segments=True)[-1]
    logits = [jax.jit(model.apply)(variables, tokens, segment_ids=segments)
              for model in (gpu, naive)]
    np.testing.assert_allclose(*logits, atol=1e-5)


@pytest.mark.parametrize("kernel, attention, message", [
    ("cudnn", AttentionConfig(pattern="sliding,chunked"),
     "cudnn does not run chunked layers (layer 1)"),
    ("cudnn", AttentionConfig(pattern="global", positions="rope,alibi"),
     "cudnn does not run alibi positions (layer 1)"),
    ("pallas_gpu", AttentionConfig(pattern="global,sliding"),
     "pallas_gpu does not run sliding layers (layer 1)"),
])
def test_config_refuses_layers_gpu_kernels_cannot_run(kernel, attention, message):
    config = Config(model=tiny_model(attention=dataclasses.replace(attention, kernel=kernel)))
    message = f"model.attention.kernel: {message}; use kernel=auto or blockwise"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        config_lib.validate(config)


def test_config_accepts_gpu_kernel_layers_and_refuses_pallas_gpu_lengths_off_16():
    for kernel, pattern in (("cudnn", "global,sliding"), ("pallas_gpu", "global")):
        attention = AttentionConfig(pattern=pattern, kernel=kernel)
        config_lib.validate(Config(model=tiny_model(attention=attention)))
    config = Config(model=tiny_model(attention=AttentionConfig(kernel="pallas_gpu")),
                    train=TrainConfig(seq_len=40))
    with pytest.raises(ConfigError, match="^train.seq_len: 40 must be a multiple of 16"):
        config_lib.validate(config)
    assert Attention(num_heads=1, num_kv_heads=1, head_dim=8).kernel == "auto"
