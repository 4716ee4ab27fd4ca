"""Run under torchrun with 2 gloo processes (tests/test_fullscale.py does): each tiny model trained
3 steps with FSDP2 (train.shard: fully_shard per block + root) against the same model trained in this
process alone on the same global batch (the two halves with the same noise seeds, gradients averaged,
as FSDP's reduce-scatter does). Rank 0 writes the losses and the largest weight difference as JSON."""
import copy
import gc
import json
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from data.toyworld import load_dataset  # noqa: E402

SETS = {"agra": [], "mvwam": [], "eawm": ["dim=64", "heads=2", "ffn_dim=128", "lora_rank=4", "stage=stage2"]}


def main(data_dir: str, out: str):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    arrays, meta = load_dataset(data_dir)
    result = {}
    for name, sets in SETS.items():
        cfg = train.make_config(name, "tiny", sets)
        torch.manual_seed(0)
        model = train.model_module(name).Model(cfg)                   # identical on every rank
        ref = copy.deepcopy(model)                                    # the one-process reference
        model.param_groups()
        root = train.shard(model, train.LossModule(model), torch.device("cpu"), torch.float32, world)
        opt = torch.optim.AdamW(model.param_groups(), lr=1e-3)
        opt_ref = torch.optim.AdamW(ref.param_groups(), lr=1e-3)
        data = train.dataset_for(cfg, arrays, meta)
        losses, losses_ref = [], []
        for step in range(3):
            halves = [data.sample(2, torch.Generator().manual_seed(100 * step + r)) for r in range(world)]
            torch.manual_seed(1000 * step + rank)                     # this rank's noise
            loss, _ = root(halves[rank])
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
            opt.step()
            opt.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
            total = 0.0
            for r in range(world):                                    # the same halves and noise, one process
                torch.manual_seed(1000 * step + r)
                l_r, _ = ref.loss(halves[r])
                (l_r / world).backward()
                total += l_r.item() / world
            torch.nn.utils.clip_grad_norm_([p for g in opt_ref.param_groups for p in g["params"]], cfg.grad_clip)
            opt_ref.step()
            opt_ref.zero_grad()
            losses_ref.append(total)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            ref_sd = ref.state_dict()
            result[name] = {"losses": losses, "losses_ref": losses_ref,
                            "max_weight_diff": max((sd[k].float() - ref_sd[k].float()).abs().max().item() for k in ref_sd),
                            "keys_equal": sorted(sd) == sorted(ref_sd)}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    # Teardown in order: the sharded model (its device mesh holds the gloo group) is freed while the group is alive,
    # both ranks reach the end before either destroys the group. Left to interpreter finalization, gloo's teardown
    # can abort a rank ("terminate called without an active exception"; seen once in CI, on rank 1).
    del model, root, opt, sd
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
