"""Sparsified training split over 2 processes (CPU, gloo) matches one process on the same global batches.

Both runs see the same global batch each step; rank r takes its half. DDP and FSDP2 average the ranks'
gradients, so with a mean-reduced loss the averaged gradient is the single-process one up to rounding.
SR-STE adds ``lambda * W`` to each rank's gradient before the average; W is identical on every rank, so the
average still adds exactly ``lambda * W`` once.
"""

import os
import re
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import TimmStyleViT, free_port, nonzeros_per_group, rank0_outcome
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import nmflow

WORLD_SIZE = 2
STEPS = 12
GLOBAL_BATCH = 8
SPARSITY = {"ff": "1:4", "qk": "2:4"}
TARGETS = tuple(f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn.qkv", "mlp.fc1", "mlp.fc2"))
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}
# every rendezvous and collective gives up after this, so a dead or stuck peer fails a test instead of hanging it
PEER_TIMEOUT = timedelta(seconds=60)


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=gen), torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen))
        for _ in range(STEPS)
    ]


def build(method: str) -> tuple[nn.Module, nmflow.Sparsifier]:
    """The same initial weights in every process: dense 0-3, sparse 3-9, finetune 9-12."""
    torch.manual_seed(0)
    model = TimmStyleViT(depth=2)
    recipe = nmflow.Recipe(method, SPARSITY, dense_steps=3, finetune_steps=3)
    return model, nmflow.sparsify(model, recipe, STEPS, verbose=False)


def record_forward_masks(sp: nmflow.Sparsifier) -> dict[str, list[torch.Tensor]]:
    """Keep the mask of every weight a forward pass uses, recomputed from the tensor handed to the parametrization."""
    seen: dict[str, list[torch.Tensor]] = {t.qualified_name: [] for t in sp.targets}
    for t in sp.targets:
        parametrization = t.module.parametrizations[t.param_name][0]

        def keep(module, args, output, name=t.qualified_name):
            seen[name].append(module.mask(args[0]).clone())

        parametrization.register_forward_hook(keep)
    return seen


def train(model: nn.Module, sp: nmflow.Sparsifier, forward: nn.Module, rank: int, world_size: int) -> list[tuple]:
    """Plain loop; each rank trains on its share of every global batch. Returns the status after each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    share = GLOBAL_BATCH // world_size
    statuses = []
    for images, labels in global_batches():
        part = slice(rank * share, (rank + 1) * share)
        F.cross_entropy(forward(images[part]), labels[part]).backward()  # mean over the share
        optimizer.step()
        optimizer.zero_grad()
        sp.step()
        status = sp.status()
        statuses.append((status.step, status.phase.value, status.decay, status.by_layer))
    return statuses


def reference(method: str) -> dict:
    """One process, whole global batches."""
    model, sp = build(method)
    masks = record_forward_masks(sp)
    statuses = train(model, sp, model, rank=0, world_size=1)
    trained = {name: p.detach().clone() for name, p in model.named_parameters()}
    sp.finalize()
    return {"masks": masks, "statuses": statuses, "trained": trained, "final": model.state_dict()}


def same_on_every_rank(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(g, tensor) for g in gathered)


def spawn(worker, method: str, out_dir: Path) -> list[dict]:
    mp.spawn(worker, args=(free_port(), method, str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def max_difference(run: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    return max(float((run[name] - value).abs().max()) for name, value in expected.items())


def assert_same_masks(masks: dict[str, list[torch.Tensor]], expected: dict[str, list[torch.Tensor]]) -> None:
    assert masks.keys() == expected.keys() == set(TARGETS)
    for name, per_forward in expected.items():
        assert len(masks[name]) == len(per_forward) == STEPS
        for step, mask in enumerate(per_forward):
            assert torch.equal(masks[name][step], mask), f"{name}: forward {step} used another mask"
    assert not expected["blocks.0.mlp.fc1"][-1].all()  # the comparison covered sparse masks, not only dense ones


# ------------------------------------------------------------------ DDP
def ddp_worker(rank: int, port: int, method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE, timeout=PEER_TIMEOUT
    )
    try:
        model, sp = build(method)
        masks = record_forward_masks(sp)
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        statuses = train(model, sp, ddp, rank, WORLD_SIZE)
        trained = {name: p.detach().clone() for name, p in model.named_parameters()}
        # masks are never communicated: check after the fact that every rank computed the same ones
        agree = {name: same_on_every_rank(torch.stack(forwards).to(torch.uint8)) for name, forwards in masks.items()}
        sp.finalize()
        record = {"masks": masks, "agree": agree, "statuses": statuses, "trained": trained, "final": model.state_dict()}
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["mdgf-exp", "srste"])
def test_two_ddp_ranks_on_half_batches_match_one_process_on_whole_batches(method, tmp_path):
    ranks = spawn(ddp_worker, method, tmp_path)
    expected = reference(method)

    assert [s[1] for s in expected["statuses"]] == ["dense"] * 2 + ["sparse"] * 6 + ["finetune"] * 4
    for record in ranks:
        assert all(record["agree"].values()), record["agree"]
        assert record["statuses"] == expected["statuses"]
        assert_same_masks(record["masks"], expected["masks"])
        torch.testing.assert_close(record["trained"], expected["trained"], **TOLERANCE)
        torch.testing.assert_close(record["final"], expected["final"], **TOLERANCE)
    for name in TARGETS[1:3]:
        assert (nonzeros_per_group(ranks[0]["final"][f"{name}.weight"], 4, in_dim=1) == 1).all()


# ------------------------------------------------------------------ FSDP2
def fsdp_worker(rank: int, port: int, method: str, out_dir: str) -> None:
    """Sparsify first, then shard every block and the root (FSDP2 shards dim 0: whole rows, whole groups)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE, timeout=PEER_TIMEOUT
    )
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        model, sp = build(method)
        masks = record_forward_masks(sp)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        originals = {t.qualified_name: t.module.parametrizations[t.param_name].original for t in sp.targets}
        local_shapes = {name: list(w.to_local().shape) for name, w in originals.items()}
        statuses = train(model, sp, model, rank, WORLD_SIZE)
        trained = {name: p.detach().full_tensor() for name, p in model.named_parameters()}
        # the supported way to finalize: gather a full checkpoint, finalize an unsharded copy
        full_state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
        unsharded, sp_unsharded = build(method)
        unsharded.load_state_dict(full_state)
        sp_unsharded.load_state_dict(sp.state_dict())
        sp_unsharded.finalize()
        record = {
            "masks": masks,
            "local_shapes": local_shapes,
            "statuses": statuses,
            "trained": trained,
            "final": unsharded.state_dict(),
        }
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["mdgf-exp", "srste", "oneshot", "sdgf-stepwise", "sdgf-geometric"])
def test_fsdp2_sharded_training_matches_one_process_and_finalizes_from_a_full_checkpoint(method, tmp_path):
    ranks = spawn(fsdp_worker, method, tmp_path)
    expected = reference(method)

    for record in ranks:
        assert record["local_shapes"]["blocks.0.mlp.fc1"] == [16, 16]  # fc1 is [32, 16]: half the rows, whole groups
        assert record["local_shapes"]["blocks.0.attn.qkv"] == [24, 16]
        assert record["statuses"] == expected["statuses"]
        assert_same_masks(record["masks"], expected["masks"])  # the forward sees whole weights, not shards
        torch.testing.assert_close(record["trained"], expected["trained"], **TOLERANCE)
        torch.testing.assert_close(record["final"], expected["final"], **TOLERANCE)
    final = ranks[0]["final"]
    for name in TARGETS[1:3]:
        assert (nonzeros_per_group(final[f"{name}.weight"], 4, in_dim=1) == 1).all()
    assert (nonzeros_per_group(final["blocks.0.attn.qkv.weight"][:32], 4, in_dim=1) == 2).all()


# ------------------------------------------------------------------ FSDP2 on GPT-2 (Conv1D: [in, out] weights)
GPT2_SMALL = {"vocab_size": 32, "n_positions": 8, "n_embd": 16, "n_layer": 2, "n_head": 2}


def build_gpt2(method: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    recipe = nmflow.Recipe(method, {"ff": "1:4", "qk": "2:4"}, dense_steps=3, finetune_steps=3)
    return model, nmflow.sparsify(model, recipe, STEPS, verbose=False)


def train_gpt2(model, sp, rank: int, world_size: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    share = GLOBAL_BATCH // world_size
    for _ in range(STEPS):
        ids = torch.randint(0, GPT2_SMALL["vocab_size"], (GLOBAL_BATCH, 9), generator=gen)[rank * share :][:share]
        logits = model(input_ids=ids[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.step()


def fsdp_gpt2_worker(rank: int, port: int, method: str, out_dir: str) -> None:
    """FSDP2 shards dim 0, which is the *input* dimension of a Conv1D weight: the N:M groups are split across
    ranks, so the mask must come from the gathered weight in the forward pass, never from a shard."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE, timeout=PEER_TIMEOUT
    )
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        model, sp = build_gpt2(method)
        masks = record_forward_masks(sp)
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        fc = model.transformer.h[0].mlp.c_fc.parametrizations.weight.original
        train_gpt2(model, sp, rank, WORLD_SIZE)
        trained = {name: p.detach().full_tensor() for name, p in model.named_parameters()}
        torch.save(
            {"masks": masks, "trained": trained, "fc_local": list(fc.to_local().shape)}, Path(out_dir) / f"{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["sdgf-stepwise", "srste"])
def test_fsdp2_on_gpt2_conv1d_weights_sharded_across_groups_matches_one_process(method, tmp_path):
    mp.spawn(fsdp_gpt2_worker, args=(free_port(), method, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    model, sp = build_gpt2(method)
    expected_masks = record_forward_masks(sp)
    train_gpt2(model, sp, rank=0, world_size=1)
    expected = {name: p.detach() for name, p in model.named_parameters()}
    for rank in range(WORLD_SIZE):
        record = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert record["fc_local"] == [8, 64]  # c_fc is [16 in, 64 out]: each rank holds half of every group
        for name, per_forward in expected_masks.items():
            for step, mask in enumerate(per_forward):
                assert torch.equal(record["masks"][name][step], mask), f"{name}: forward {step} used another mask"
        torch.testing.assert_close(record["trained"], expected, **TOLERANCE)
    assert not expected_masks["transformer.h.0.mlp.c_fc"][-1].all()  # sparse masks were compared


def sparsify_after_shard_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=1, timeout=PEER_TIMEOUT
    )
    try:
        torch.manual_seed(0)
        model = TimmStyleViT(depth=1)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
        try:
            nmflow.sparsify(model, nmflow.Recipe("ste", SPARSITY), STEPS, verbose=False)
            message = "no error"
        except nmflow.ConfigError as err:
            message = str(err)
        unchanged = all(torch.equal(v.full_tensor(), before[k]) for k, v in model.state_dict().items())
        torch.save({"message": message, "unchanged": unchanged}, Path(out_dir) / "result.pt")
    finally:
        dist.destroy_process_group()


def test_sparsify_after_fully_shard_is_refused_with_a_clear_error(tmp_path):
    mp.spawn(sparsify_after_shard_worker, args=(free_port(), str(tmp_path)), nprocs=1, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert "call nmflow.sparsify before fully_shard" in result["message"] and result["unchanged"]


def sharded_guard_worker(rank: int, port: int, method: str, out_dir: str) -> None:
    """A NaN in one rank's shard must stop every rank; finalize() must refuse sharded weights."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE, timeout=PEER_TIMEOUT
    )
    try:
        model, sp = build(method)
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD_SIZE,)))
        for _ in range(4):  # into the sparse phase: masks are due at every step
            sp.step()
        errors = {}
        try:
            sp.finalize()
        except nmflow.ConfigError as err:
            errors["finalize"] = str(err)
        original = model.blocks[0].mlp.fc1.parametrizations.weight.original
        if rank == 1:
            with torch.no_grad():
                original.to_local()[0, 0] = float("nan")
        try:
            sp.step()
        except nmflow.NonFiniteWeightError as err:
            errors["step"] = str(err)
        errors["step_count"] = sp.step_count
        torch.save(errors, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # leave together: gloo can abort a rank whose peer tears down first
    finally:
        dist.destroy_process_group()


def test_fsdp2_nan_in_one_shard_stops_every_rank_and_sharded_finalize_is_refused(tmp_path):
    for record in spawn(sharded_guard_worker, "mdgf-exp", tmp_path):
        assert "blocks.0.mlp.fc1" in record["step"] and record["step_count"] == 4
        assert "gather a full state dict" in record["finalize"]


# ------------------------------------------------------------------ a dead or stuck peer
SHORT_TIMEOUT = timedelta(seconds=5)


def abandoned_worker(rank: int, port: int, fate: str, out_dir: str) -> None:
    """Rank 1 never joins, or dies (SIGKILL) or hangs at step 3; rank 0 records how it fails."""
    torch.set_num_threads(1)
    if rank == 1 and fate == "absent":
        return
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE, timeout=SHORT_TIMEOUT
        )
        model, sp = build("mdgf-exp")
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step, (images, labels) in enumerate(global_batches()):
            if rank == 1 and step == 3:
                if fate == "killed":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)  # stuck: alive, holding its connections, never at the next all-reduce
            F.cross_entropy(ddp(images[:4]), labels[:4]).backward()
            optimizer.step()
            optimizer.zero_grad()
            sp.step()
        outcome = "finished"
    except Exception as err:  # whatever torch.distributed raises: the test checks it says what happened
        outcome = f"{type(err).__name__}: {err}"
    Path(out_dir, f"rank{rank}.txt").write_text(outcome)


FATES = {  # what rank 1 does -> what rank 0's error must say
    "absent": "1/2 clients joined",
    "killed": "Connection reset by peer|Connection closed by peer",
    "stuck": "Timed out waiting 5000ms",
}


@pytest.mark.parametrize("fate", FATES)
def test_a_missing_dead_or_stuck_peer_fails_the_other_rank_with_a_clear_error(fate, tmp_path):
    outcome = rank0_outcome(abandoned_worker, (free_port(), fate, str(tmp_path)), tmp_path, WORLD_SIZE)
    assert re.search(FATES[fate], outcome), outcome
