"""Sparsified models under torch.compile (same numbers as eager, few recompiles) and under 2-process DDP."""

import copy
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import TimmStyleMlp, TimmStyleViT, free_port, nonzeros_per_group
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize

import nmflow

IMAGE_SHAPE = (4, 3, 8, 8)
CLASSES = 3
# rendezvous and collectives give up after this (generous: compiling on 2 loaded cores), so a dead peer cannot hang
PEER_TIMEOUT = timedelta(seconds=180)


def image_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(*IMAGE_SHAPE, generator=gen), torch.randint(0, CLASSES, (IMAGE_SHAPE[0],), generator=gen)


def vit_loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    images, labels = image_batch(gen)
    return F.cross_entropy(model(images), labels)


def mlp_loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    return model(torch.randn(4, 16, generator=gen)).square().mean()


def schedule_state(status: nmflow.SparsityStatus) -> tuple:
    """What the forward graph depends on: decaying or binary, and each layer's pattern (or dense).

    At most one compilation per distinct state is expected, and at least one: none would mean dynamo
    fell back to eager and the comparison with eager proved nothing.
    """
    return status.decay is None, tuple(sorted(status.by_layer.items()))


# ------------------------------------------------------------------ torch.compile
def compare_compiled_with_eager(build, loss_fn, recipe: nmflow.Recipe, total_steps: int, backend: str) -> dict:
    """Train an eager and a compiled copy side by side, asserting equal losses and gradients every step."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = build()
    compiled_model = copy.deepcopy(eager)
    sp_eager = nmflow.sparsify(eager, recipe, total_steps, verbose=False)
    sp_compiled = nmflow.sparsify(compiled_model, recipe, total_steps, verbose=False)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(compiled_model, backend=counter)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    gen_eager, gen_compiled = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)

    statuses, compiles = [], []
    for _ in range(total_steps):
        statuses.append(sp_compiled.status())
        loss_eager = loss_fn(eager, gen_eager)
        loss_compiled = loss_fn(compiled, gen_compiled)
        loss_eager.backward()
        loss_compiled.backward()
        compiles.append(counter.frame_count)
        torch.testing.assert_close(loss_compiled, loss_eager)
        for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, msg=lambda m, name=name: f"{name}: {m}")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        sp_eager.step()
        sp_compiled.step()
    assert sp_compiled.status() == sp_eager.status()
    for p_eager, p_compiled in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_compiled, p_eager)
    return {"statuses": statuses, "compiles": compiles, "graph_breaks": sum(counters["graph_break"].values())}


def test_compiled_mdgf_matches_eager_and_does_not_recompile_while_the_decay_changes():
    recipe = nmflow.Recipe("mdgf-exp", {"ff": "1:4", "qk": "2:4"}, dense_steps=2, finetune_steps=2)
    run = compare_compiled_with_eager(lambda: TimmStyleViT(depth=1), vit_loss, recipe, 9, "aot_eager")

    statuses, compiles = run["statuses"], run["compiles"]
    phases = [s.phase for s in statuses]
    assert phases == [nmflow.Phase.DENSE] * 2 + [nmflow.Phase.SPARSE] * 5 + [nmflow.Phase.FINETUNE] * 2
    sparse = [i for i, phase in enumerate(phases) if phase is nmflow.Phase.SPARSE]
    decays = [statuses[i].decay for i in sparse]
    assert all(a > b for a, b in zip(decays, decays[1:]))  # D really changed from step to step
    assert compiles[sparse[-1]] == compiles[sparse[0]]  # ... without a recompilation
    assert 1 <= compiles[-1] <= len({schedule_state(s) for s in statuses})
    assert run["graph_breaks"] == 0


def test_compiled_sdgf_matches_eager_across_pattern_changes():
    recipe = nmflow.Recipe("sdgf-stepwise", {"ff": "1:4", "qk": "1:4"}, dense_steps=2, finetune_steps=2)
    run = compare_compiled_with_eager(lambda: TimmStyleViT(depth=1), vit_loss, recipe, 8, "aot_eager")

    walked = [s.by_layer["blocks.0.mlp.fc1"] for s in run["statuses"]]
    assert walked == ["dense", "dense", "3:4", "3:4", "2:4", "1:4", "1:4", "1:4"]
    assert 1 <= run["compiles"][-1] <= len({schedule_state(s) for s in run["statuses"]})
    assert run["graph_breaks"] == 0


def test_inductor_matches_eager_through_every_phase():
    recipe = nmflow.Recipe("mdgf-exp", {"re:fc[12]": "1:4"}, dense_steps=1, finetune_steps=1)
    run = compare_compiled_with_eager(lambda: TimmStyleMlp(16, 32), mlp_loss, recipe, 4, "inductor")

    assert [s.phase for s in run["statuses"]] == [
        nmflow.Phase.DENSE,
        nmflow.Phase.SPARSE,
        nmflow.Phase.SPARSE,
        nmflow.Phase.FINETUNE,
    ]
    assert 1 <= run["compiles"][-1] <= len({schedule_state(s) for s in run["statuses"]})
    assert run["graph_breaks"] == 0


# ------------------------------------------------------------------ DDP
WORLD_SIZE = 2
DDP_STEPS = 6
DDP_SPARSITY = {"ff": "1:4", "qk": "2:4"}
DDP_TARGETS = ("blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2")


def ddp_worker(rank: int, port: int, method: str, out_dir: str) -> None:
    """One rank: train a sparsified model through every phase under DDP and save what the parent compares."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE, timeout=PEER_TIMEOUT
    )
    try:
        torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
        model = TimmStyleViT(depth=1)
        recipe = nmflow.Recipe(method, DDP_SPARSITY, dense_steps=2, finetune_steps=2)
        sp = nmflow.sparsify(model, recipe, DDP_STEPS, verbose=False)
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank trains on its own batches
        record = {"phases": [], "without_grad": [], "grads": [], "masks": []}
        for _ in range(DDP_STEPS):
            record["phases"].append(sp.status().phase.value)
            vit_loss(ddp, gen).backward()
            record["without_grad"].append([name for name, p in model.named_parameters() if p.grad is None])
            record["grads"].append({name: p.grad.clone() for name, p in model.named_parameters()})
            optimizer.step()
            optimizer.zero_grad()
            sp.step()
            if sp.status().phase is not nmflow.Phase.DENSE:
                record["masks"].append({t.qualified_name: current_mask(t) for t in sp.targets})
        sp.finalize()
        record["parametrized"] = [name for name, m in model.named_modules() if parametrize.is_parametrized(m)]
        record["final"] = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def current_mask(target) -> torch.Tensor:
    parametrization = target.module.parametrizations[target.param_name]
    return parametrization[0].mask(parametrization.original).clone()


@pytest.mark.parametrize("method", ["mdgf-exp", "srste", "oneshot"])
def test_ddp_ranks_agree_on_masks_and_weights_without_unused_parameters(method, tmp_path):
    mp.spawn(ddp_worker, args=(free_port(), method, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    assert ranks[0]["phases"] == ["dense"] * 2 + ["sparse"] * 2 + ["finetune"] * 2
    for record in ranks:
        assert all(not missing for missing in record["without_grad"]), record["without_grad"]
        assert not record["parametrized"]
    for step, grads in enumerate(ranks[0]["grads"]):
        for name, grad in grads.items():
            assert torch.equal(ranks[1]["grads"][step][name], grad), f"step {step}: {name} gradients differ"
    masks_per_step = ranks[0]["masks"]  # recorded after each step that ends outside the dense phase
    assert len(masks_per_step) == len(ranks[1]["masks"]) == DDP_STEPS - 1
    for step, masks in enumerate(masks_per_step):
        assert masks.keys() == ranks[1]["masks"][step].keys() == set(DDP_TARGETS)
        for name, mask in masks.items():
            assert torch.equal(ranks[1]["masks"][step][name], mask), f"step {step}: {name} masks differ"
            if method == "oneshot":  # pruned once at the end of the dense phase, then frozen
                assert torch.equal(mask, masks_per_step[0][name]), f"step {step}: {name} one-shot mask moved"
    final = ranks[0]["final"]
    for name, value in final.items():
        assert torch.equal(ranks[1]["final"][name], value), f"{name} differs between ranks"
    for name in ("blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"):
        assert (nonzeros_per_group(final[name], 4, in_dim=1) == 1).all()
    q_and_k = final["blocks.0.attn.qkv.weight"][:32]  # row blocks: Q then K, 16 rows each
    assert (nonzeros_per_group(q_and_k, 4, in_dim=1) == 2).all()
