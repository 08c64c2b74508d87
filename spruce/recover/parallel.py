"""Training in several processes: DDP through accelerate, FSDP2 through torch's fully_shard.

    torchrun --nproc_per_node 2 -m spruce.cli finetune ...                  # DDP
    torchrun --nproc_per_node 2 -m spruce.cli finetune ... --fsdp           # FSDP2, one unit per decoder layer
    accelerate launch --num_processes 2 -m spruce.cli finetune ...          # DDP, or FSDP with an FSDP config

A launcher sets WORLD_SIZE, RANK and LOCAL_RANK; with more than one process `Parallel.from_env`
starts the process group through accelerate's Accelerator (NCCL on GPUs, gloo on CPUs), each
process on its own GPU. DDP keeps a full copy of the model per process and averages gradients;
FSDP2 shards every parameter by rows (a DTensor per parameter), so `local_view` and `local_part`
give the part of a weight, gradient or mask that this process holds.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch

from ..errors import SpruceError


def launch_env() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, processes on this machine) as the launcher set them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), local_world


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return ()
    return DTensor


def local_view(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this process holds (its FSDP shard), or `t` itself when it is not sharded."""
    return t.to_local() if isinstance(t, _dtensor_type()) else t


def local_part(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The rows of the full-size tensor `full` that this process holds of the sharded `param`."""
    if not isinstance(param, _dtensor_type()):
        return full.to(param.device)
    from torch.distributed.tensor import Shard

    if tuple(param.placements) != (Shard(0),):
        raise SpruceError(f"cannot place a mask on a parameter sharded as {param.placements}; "
                          "spruce masks FSDP2 parameters sharded by rows (Shard(0))")
    mesh = param.device_mesh
    chunks = torch.chunk(full, mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    local = local_view(param)
    part = chunks[rank] if rank < len(chunks) else full[:0]
    if part.shape != local.shape:
        raise SpruceError(f"mask shard {tuple(part.shape)} does not match the parameter shard {tuple(local.shape)}")
    return part.to(local.device)


def fsdp_settings(fsdp: bool, layer_cls: str | None) -> dict | None:
    """FSDP from the command line (--fsdp) or from an accelerate config (accelerate launch sets
    ACCELERATE_USE_FSDP and FSDP_* variables); None for DDP."""
    from_accelerate = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not (fsdp or from_accelerate):
        return None
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").upper() if from_accelerate \
        else "TRANSFORMER_BASED_WRAP"
    if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
        raise SpruceError(f"FSDP auto-wrap policy {policy} is not supported; use TRANSFORMER_BASED_WRAP "
                          "(one unit per decoder layer)")
    names = layer_cls or os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0", "no_shard")
    return {"classes": [] if policy == "NO_WRAP" else [c.strip() for c in (names or "").split(",") if c.strip()],
            "default_classes": not names and policy != "NO_WRAP", "reshard_after_forward": reshard}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def fsdp_units(model, classes: list[str]) -> list[torch.nn.Module]:
    """The modules that become FSDP units: those of the named classes (the root is one more)."""
    return [m for m in model.modules() if type(m).__name__ in classes and m is not model]


def check_fsdp_wrapping(model, classes: list[str]) -> list[torch.nn.Module]:
    """Refuse a wrapping that leaves one FSDP unit larger than a decoder layer (or the
    embeddings and head that the root keeps): every process would gather it whole."""
    from ..models import decoder_layers

    present = {type(m).__name__ for m in model.modules()}
    layers = decoder_layers(model)
    layer_cls = type(layers[0]).__name__
    missing = [c for c in classes if c not in present]
    if missing:
        raise SpruceError(f"FSDP: no module of class {', '.join(missing)} in this model; its decoder layers "
                          f"are {layer_cls} (--fsdp_transformer_layer_cls_to_wrap {layer_cls})")
    units = fsdp_units(model, classes)
    inner = {id(p) for u in units for p in u.parameters()}
    root_own = sum(p.numel() for p in model.parameters() if id(p) not in inner)
    total = _count(model)
    embed_head = _count(model.get_input_embeddings()) + sum(
        p.numel() for p in (model.get_output_embeddings() or torch.nn.Module()).parameters())
    limit = max(max(_count(layer) for layer in layers), embed_head + sum(
        p.numel() for n, p in model.named_parameters() if "norm" in n and "layers." not in n))
    sizes = [(root_own, "the root unit")] + [(_count(u) - sum(_count(c) for c in fsdp_units(u, classes)),
                                              type(u).__name__) for u in units]
    size, where = max(sizes, key=lambda s: s[0])
    if size > limit:
        raise SpruceError(f"FSDP wrapping leaves {where} holding {size / 1e6:.1f}M parameters ({size / total:.0%} "
                          f"of the model), more than one decoder layer ({max(_count(l) for l in layers) / 1e6:.1f}M), "
                          f"so every process would gather it whole; wrap the decoder layers with "
                          f"--fsdp_transformer_layer_cls_to_wrap {layer_cls}")
    return units


class Parallel:
    """One process of a multi-process run: rank, device, wrapping, collectives."""

    def __init__(self, accelerator, fsdp: dict | None):
        self.accelerator = accelerator
        self.fsdp = fsdp
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = self.rank == 0
        self.device = accelerator.device
        self.kind = "fsdp" if fsdp else "ddp"

    @classmethod
    def from_env(cls, device: str = "auto", fsdp: bool = False, layer_cls: str | None = None) -> "Parallel | None":
        """None in a single process; otherwise start (or join) the process group."""
        rank, world, local_rank, local_world = launch_env()
        if world <= 1:
            if fsdp:
                raise SpruceError("--fsdp needs several processes; launch with torchrun --nproc_per_node N "
                                  "or accelerate launch --num_processes N")
            return None
        settings = fsdp_settings(fsdp, layer_cls)
        want = device or "auto"
        if want.startswith("cuda") or (want == "auto" and torch.cuda.is_available()):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise SpruceError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
            if local_world > count:
                raise SpruceError(f"this launch starts {local_world} processes on this machine but only {count} "
                                  f"GPU{'s are' if count > 1 else ' is'} visible; launch with --nproc_per_node "
                                  f"{count} (torchrun) or --num_processes {count} (accelerate launch)")
            cpu = False
        elif want in ("cpu", "auto"):
            cpu = True
        else:
            raise SpruceError(f"--device {want} does not suit several processes; use auto, cuda or cpu")
        from accelerate import Accelerator

        return cls(Accelerator(cpu=cpu), settings)

    # wrapping ---------------------------------------------------------------------------------

    def wrap(self, model):
        """DDP (accelerate) or FSDP2 (fully_shard on each decoder layer, then the root)."""
        if self.fsdp is None:
            return self.accelerator.prepare_model(model)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        units = self.check_wrapping(model)
        mesh = init_device_mesh(self.device.type, (self.world,))
        reshard = self.fsdp["reshard_after_forward"]
        for unit in units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        return model

    def shard_teacher(self, teacher):
        """Under FSDP the frozen teacher is sharded like the student (each decoder layer, then the
        root), so that every process holds 1/world of it and gathers one layer at a time during
        its forward; under DDP every process keeps a whole copy on its device."""
        if self.fsdp is None:
            return teacher.to(self.device)
        return self.wrap(teacher)

    def local_fraction(self, model) -> float:
        """The share of `model`'s parameter elements that this process holds."""
        local = sum(p.to_local().numel() if isinstance(p, _dtensor_type()) else p.numel()
                    for p in model.parameters())
        return local / max(1, _count(model))

    def check_wrapping(self, model) -> list[torch.nn.Module]:
        """The FSDP units of `model` (none for DDP); a wrapping that leaves a unit too large is refused."""
        if self.fsdp is None:
            return []
        from ..models import decoder_layers

        classes = self.fsdp["classes"]
        if self.fsdp["default_classes"]:
            classes = [type(decoder_layers(model)[0]).__name__]
        return check_fsdp_wrapping(model, classes)

    def unwrap(self, model):
        return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

    def sync_gradients(self, model, sync: bool):
        """Context for one micro-batch: gradients are reduced across processes only when `sync`."""
        if sync:
            return contextlib.nullcontext()
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(False)
            return _restore_sync(model)
        return contextlib.nullcontext()

    # collectives ------------------------------------------------------------------------------

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        values = values.to(self.device)
        dist.all_reduce(values)
        return values.cpu()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def full_tensors(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full CPU copies of (possibly sharded) tensors; every process must call it, in the same order."""
        out = {}
        for name, t in named.items():
            full = t.full_tensor() if isinstance(t, _dtensor_type()) else t
            out[name] = full.detach().cpu().contiguous()
        return out

    def optimizer_state(self, model, optimizer) -> dict:
        """The optimizer state keyed by parameter names, whole, on rank 0 (collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def close(self) -> None:
        """Leave the process group together. Rank 0 may still be saving, merging and evaluating
        after the others are done; they wait for it on the rendezvous store (no collective
        timeout applies there), then every rank passes one barrier and destroys the group. A rank
        that tore its group down while a peer still held connections could abort at exit."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        store = dist.distributed_c10d._get_default_store()
        if self.is_main:
            store.set(_FINISHED_KEY, "1")
        else:
            store.wait([_FINISHED_KEY], _FINISH_WAIT)
        dist.barrier()
        dist.destroy_process_group()


_FINISHED_KEY = "spruce/rank0-finished"
_FINISH_WAIT = datetime.timedelta(hours=12)  # rank 0's merge and evaluation of a large model


@contextlib.contextmanager
def _restore_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
