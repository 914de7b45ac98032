"""Document masking (--reset-attention-mask --reset-position-ids --eod-mask-loss): a packed batch
gives the loss and gradients of its documents run one by one, padded, with the pads' loss masked.

The documents of each packed sample end with the eod token; the last one's eod is the sample's
last label. With the three flags each document sees only itself, from position 0, and the
target after each eod (the next document's first token) carries no loss, so the packed
microbatch's loss is the mean over the same predictions as the padded one's. Checked on one
device (llama and gpt2) and at tp 2 + SP, pp 2, cp 2 (p2p, allgather) and cp 2 a2a (llama, one
spawn of 2 ranks), each with the plain-torch attention and with the flash kernel (Triton under
the interpreter on CPU, fp32: MEGATRON_LITE_TRITON=1; the model's other ops plain torch).
Tolerances as tests/helpers/parity.py's
step 1 (packing changes only the order of the sums).

Also here: the batch the data loader derives from the eod token, and generation's prompts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import pytest
import torch

from helpers.parity import PARITY, full_grads, merge_tensors, setup_rank
from helpers.tiny import tiny_config
from megatron_lite.config.layout import Layout
from megatron_lite.context_parallel.zigzag import split_for_context_parallel
from megatron_lite.data.documents import DocumentMasking, document_starts
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.inference.generation import generate
from megatron_lite.inference.sampling import SamplingParams
from megatron_lite.model import fused_ops, ops
from megatron_lite.model.gpt import GPTModel, init_weights
from megatron_lite.planner.activation_memory import stage_bytes
from megatron_lite.planner.flops import flops_per_step
from megatron_lite.planner.hardware import GPUS
from megatron_lite.planner.step_time import estimate
from megatron_lite.training.arguments import parse_args
from megatron_lite.training.loop import train_step

EOD, SEQ, VOCAB = 256, 32, 258
# Documents per packed sample, eod included, seq + 1 tokens each: boundaries inside and on the
# edges of cp 2's chunks of 8 (the pair of query chunk 3 with key chunk 0 holds no shared
# document in either sample: ring attention skips it) and of the kernel's 16-row tiles.
LENGTHS = ([10, 15, 8], [6, 18, 9])
LAYOUTS = [Layout.parse(name) for name in ("tp2-sp", "pp2", "cp2", "cp2-allgather", "cp2-a2a")]
ALL_FLAGS = DocumentMasking(EOD, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)


def documents() -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [[torch.cat([torch.randint(0, EOD, (n - 1,), generator=generator), torch.tensor([EOD])])
             for n in lengths] for lengths in LENGTHS]


def packed_batches(masking: DocumentMasking | None = ALL_FLAGS) -> list[dict[str, torch.Tensor]]:
    """One microbatch per packed sample."""
    batches = []
    for docs in documents():
        sample = torch.cat(docs)[None]
        batch = {"tokens": sample[:, :-1], "labels": sample[:, 1:], "loss_mask": torch.ones(1, SEQ)}
        batches.append(batch if masking is None else masking.apply(batch))
    return batches


def padded_batches() -> list[dict[str, torch.Tensor]]:
    """The same documents one per row, padded to the sequence length; the pads carry no loss."""
    batches = []
    for docs in documents():
        tokens, labels, mask = torch.zeros(3, SEQ, dtype=torch.long), torch.zeros(3, SEQ, dtype=torch.long), \
            torch.zeros(3, SEQ)
        for row, doc in enumerate(docs):
            tokens[row, :len(doc) - 1], labels[row, :len(doc) - 1], mask[row, :len(doc) - 1] = doc[:-1], doc[1:], 1
        batches.append({"tokens": tokens, "labels": labels, "loss_mask": mask})
    return batches


def config(family: str = "llama", layout: Layout = Layout(), padded: bool = False):
    rows = 3 if padded else 1
    # Two heads of 32 (two kv groups: Ulysses splits them over cp): few kernel programs to interpret.
    return tiny_config(family, model=dict(hidden_size=64, num_attention_heads=2, num_query_groups=2, seq_length=SEQ,
                                          fused_kernels=False),
                       micro_batch_size=rows, global_batch_size=2 * rows).updated(parallel=layout.fields())


@contextlib.contextmanager
def attention_ops(flash: bool):
    """The plain-torch ops, with the flash kernel's attention when `flash` (Triton even on CPU);
    the other kernels (their own tests cover them) would only slow the interpreter down."""
    if not flash:
        yield
        return
    plain, os.environ["MEGATRON_LITE_TRITON"] = ops.TORCH_OPS, "1"
    ops.TORCH_OPS = dataclasses.replace(plain, attention=fused_ops.attention,
                                        attention_block_forward=fused_ops.attention_block_forward,
                                        attention_block_backward=fused_ops.attention_block_backward)
    try:
        yield
    finally:
        ops.TORCH_OPS = plain
        del os.environ["MEGATRON_LITE_TRITON"]


def one_step(cfg, batches: list[dict[str, torch.Tensor]], flash: bool) -> dict:
    """Loss and full grads (before clipping) of one step on this rank."""
    with attention_ops(flash):
        model = setup_rank(cfg)
        grads = {}
        loss = train_step(model, [split_for_context_parallel(b) for b in batches], 1, cfg, torch.device("cpu"),
                          inspect_grads=lambda m: grads.update(full_grads(m))).loss
    return {"loss": loss, "grads": grads}


def assert_same_step(want: dict, got: dict) -> None:
    assert got["loss"] == pytest.approx(want["loss"], rel=PARITY.loss)
    assert want["grads"].keys() == got["grads"].keys()
    for name, grad in want["grads"].items():
        grad, other = grad[:VOCAB], got["grads"][name][:VOCAB]  # the vocabulary's pad rows differ with tp
        assert (other - grad).abs().max().item() / (grad.abs().max().item() or 1.0) <= PARITY.grad, name


def layouts_worker() -> dict:
    return {(layout, flash): one_step(config("llama", layout), packed_batches(), flash)
            for layout in LAYOUTS for flash in (False, True)}


@functools.cache
def padded_reference(family: str) -> dict:
    return one_step(config(family, padded=True), padded_batches(), flash=False)


@pytest.mark.parametrize("family,flash", [("llama", False), ("llama", True), ("gpt2", False)],
                         ids=["llama-torch", "llama-flash", "gpt2-torch"])
def test_packed_documents_match_padded_on_one_device(family: str, flash: bool) -> None:
    assert_same_step(padded_reference(family), one_step(config(family), packed_batches(), flash))


def test_without_the_flags_documents_see_each_other() -> None:
    """The masks change the model: the same packed batch without them gives another loss (at
    initialisation the predictions are near uniform, so by little, but by far more than rounding)."""
    plain = one_step(config(), packed_batches(None), flash=False)
    assert plain["loss"] != pytest.approx(padded_reference("llama")["loss"], rel=1e-5)


@functools.cache
def spawned() -> list[dict]:
    return run_on_ranks(layouts_worker, 2)


@pytest.mark.parametrize("flash", [False, True], ids=["torch", "flash"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def test_packed_documents_match_padded_in_parallel(layout: Layout, flash: bool) -> None:
    ranks = [r[layout, flash] for r in spawned()]
    assert ranks[0]["loss"] == ranks[1]["loss"]
    assert_same_step(padded_reference("llama"), {"loss": ranks[0]["loss"],
                                                 "grads": merge_tensors([r["grads"] for r in ranks])})


def test_batch_derived_from_the_eod_token() -> None:
    """Megatron's get_ltor_masks_and_position_ids: the token after an eod starts a document."""
    tokens = torch.tensor([[5, EOD, 7, 8, EOD, EOD, 9], [EOD, 1, 2, 3, 4, 5, 6]])
    assert document_starts(tokens, EOD).tolist() == [[0, 0, 2, 2, 2, 5, 6], [0, 1, 1, 1, 1, 1, 1]]
    batch = ALL_FLAGS.apply({"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(2, 7)})
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 5]]
    assert batch["loss_mask"].tolist() == [[1, 0, 1, 1, 0, 0, 1], [0, 1, 1, 1, 1, 1, 1]]
    # Per sample, the sum of squared document lengths over s: what the FLOPs count takes as keys.
    assert batch["document_keys"].tolist() == pytest.approx([(4 + 9 + 1 + 1) / 7, (1 + 36) / 7])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_continues_the_last_document_of_a_prompt(family: str) -> None:
    """With the model's masking, a prompt of packed documents is continued exactly as its last
    document alone: the earlier ones out of sight, positions from the last one's start."""
    setup_rank(config(family))
    model_config = dataclasses.replace(config(family).model, init_method_std=0.5)  # so that context shows
    model = GPTModel(model_config).eval()
    init_weights(model, model_config, seed=1)
    greedy = SamplingParams(greedy=True)
    first, last = documents()[0][0].tolist(), documents()[0][1][:-1].tolist()
    alone = generate(model, last, 6, greedy, EOD)
    assert generate(model, first + last, 6, greedy, EOD, documents=ALL_FLAGS) == alone
    assert generate(model, first + last, 6, greedy, EOD) != alone


def test_flops_and_planner_count_only_each_documents_keys() -> None:
    """The score term's keys per query: the sequence's, or under document masking the mean
    document length (planner/flops.py); the planner's attention time shrinks with it."""
    model = config().model
    h, s, layers, batch = model.hidden_size, model.seq_length, model.num_layers, 8
    width = model.num_attention_heads * model.head_dim / h
    assert flops_per_step(model, batch, float(s)) == flops_per_step(model, batch)
    saved = flops_per_step(model, batch) - flops_per_step(model, batch, 8.0)
    assert saved == pytest.approx(12 * batch * s * layers * h * h * (s - 8) / h * width)
    gpu = parse_args(["--model", "llama-1b", "--bf16", "--device", "cuda", "--reset-attention-mask"])
    full, short = (estimate(gpu, GPUS["H100"], mean_document_length=n) for n in (None, 256.0))
    assert short.compute_parts["attention"] == pytest.approx(full.compute_parts["attention"] * 256 / 2048)
    assert short.step_s < full.step_s and short.mfu < full.mfu
    without = parse_args(["--model", "llama-1b", "--bf16", "--device", "cuda"])
    assert estimate(without, GPUS["H100"], mean_document_length=256.0).step_s == full.step_s
    # --reset-position-ids: one RoPE table per sample in the activation formula.
    tables = stage_bytes(model, 2, 3, per_sample_positions=True) - stage_bytes(model, 2, 3)
    assert tables == 4 * 2 * s * model.head_dim
