"""The rank grid's configuration: the size of every parallelism and how each runs.

Field docstrings become `--help` text (see model_config.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config.checks import flag, require, require_positive
from megatron_lite.config.model_config import ModelConfig

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zbv")
CP_COMM_TYPES = ("p2p", "allgather", "a2a")
# Megatron-FSDP's names for what data-parallel replicas shard, and the ZeRO stage each is:
# nothing, the optimizer state (ZeRO-1), also the gradients (ZeRO-2), also the parameters
# (ZeRO-3 / FSDP).
ZERO_STAGES = {"no_shard": 0, "optim": 1, "optim_grads": 2, "optim_grads_params": 3}
SHARDING_STRATEGIES = tuple(ZERO_STAGES)
# How data-parallel replicas combine their gradients: a ring all-reduce among equals, or a
# parameter server (distributed/parameter_server.py) that sums them and steps for everyone.
DATA_PARALLEL_MODES = ("all-reduce", "parameter-server")


def interleaved_microbatches_problem(pp: int, microbatches: int, group_size: int) -> str | None:
    """Why megatron-core's interleaved schedule refuses `microbatches` in groups of `group_size`
    (pipeline_parallel/schedules.py), or None: it needs pp <= group_size <= microbatches, and
    the last group, microbatches % group_size, empty or of at least pp. With the default group
    size pp that is a multiple of pp. In a shorter group the first rank would need a chunk's
    input before it has come around the ring from the last rank (Megatron refuses the bubble
    that would cost; our lockstep calls, which are Megatron's, would not have received it)."""
    flag_text = "--microbatch-group-size-per-virtual-pipeline-stage"
    if group_size == pp:
        if microbatches % pp:
            return (f"the interleaved schedule needs the number of microbatches ({microbatches}) to be a "
                    f"multiple of --pipeline-model-parallel-size={pp}")
        return None
    if not pp <= group_size <= microbatches:
        return (f"{flag_text}={group_size} must lie between --pipeline-model-parallel-size={pp} and the "
                f"number of microbatches ({microbatches})")
    last = microbatches % group_size
    if 0 < last < pp:
        return (f"the interleaved schedule needs the number of microbatches ({microbatches}) to be a multiple of "
                f"{flag_text}={group_size} or to leave a remainder of at least --pipeline-model-parallel-size={pp} "
                f"(it leaves {last})")
    return None


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Ranks that split each layer's weights (Megatron tensor parallelism)."""
    context_parallel_size: int = 1
    """Ranks that split each sequence (context parallelism): every layer sees 1/cp of the tokens, attention exchanges
    keys and values."""
    cp_comm_type: str = "p2p"
    """How context-parallel attention exchanges keys and values: p2p (ring), allgather (all-gather K/V) or a2a (Ulysses
    all-to-all)."""
    pipeline_model_parallel_size: int = 1
    """Ranks that split the layers into pipeline stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank (interleaved 1F1B); default 1."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """Alternative to --virtual-pipeline-model-parallel-size: layers per model chunk."""
    pipeline_schedule: str | None = None
    """gpipe, 1f1b, interleaved, zb-h1 or zbv (zero bubble; zbv runs two chunks per rank, --vpp 2 by default; default:
    interleaved when vpp > 1, else 1f1b)."""
    microbatch_group_size_per_virtual_pipeline_stage: int | None = None
    """Interleaved schedule: microbatches each model chunk runs in a row (default pp, depth-first); from pp to the
    number of microbatches, which must be a multiple of it or leave a remainder of at least pp."""
    sequence_parallel: bool = False
    """Split norms, dropout and the residual stream along the sequence across the tp group (needs tp > 1)."""
    data_parallel_size: int = 1
    """Model replicas; derived as world_size / (tp * cp * pp), never set by hand."""
    use_distributed_optimizer: bool = False
    """Shard fp32 Adam state across data-parallel ranks (ZeRO-1): reduce-scatter grads, all-gather params."""
    data_parallel_sharding_strategy: str | None = None
    """What data-parallel ranks shard: no_shard, optim (ZeRO-1, = --use-distributed-optimizer), optim_grads (ZeRO-2),
    optim_grads_params (ZeRO-3 / FSDP); default: optim with --use-distributed-optimizer, else no_shard."""
    data_parallel_mode: str = "all-reduce"
    """How data-parallel replicas average gradients: all-reduce (ring, in buckets overlapping backward) or
    parameter-server (workers send grads to dp rank 0, which steps and sends the parameters back)."""
    ddp_bucket_size: int = 40_000_000
    """Elements per data-parallel gradient bucket; a bucket's reduction starts as soon as its grads are final."""
    expert_model_parallel_size: int = 1
    """Ranks that split each MoE layer's experts (expert parallelism), carved out of tp x dp x cp (tp first); tokens
    reach their experts by all-to-all."""
    overlap_param_gather: bool = False
    """With --use-distributed-optimizer: all-gather the updated parameters in the background, each bucket waited for
    just before the next forward first uses it."""
    distributed_timeout_minutes: float = 5.0
    """A collective waiting longer than this raises instead of hanging."""

    @property
    def vpp(self) -> int:
        return self.virtual_pipeline_model_parallel_size or 1

    @property
    def sharding(self) -> str:
        """The data-parallel sharding strategy in effect (one of SHARDING_STRATEGIES)."""
        return self.data_parallel_sharding_strategy or ("optim" if self.use_distributed_optimizer else "no_shard")

    @property
    def zero_stage(self) -> int:
        """The sharding strategy as a ZeRO stage: 0 (none) to 3 (parameters too)."""
        return ZERO_STAGES[self.sharding]

    @property
    def sharded_optimizer(self) -> bool:
        """Whether the distributed optimizer steps: every strategy but no_shard shards the Adam state."""
        return self.sharding != "no_shard"

    @property
    def parameter_server(self) -> bool:
        """Whether dp rank 0 of each data-parallel group steps for the others (--data-parallel-mode)."""
        return self.data_parallel_mode == "parameter-server"

    @property
    def schedule(self) -> str:
        return self.pipeline_schedule or ("interleaved" if self.vpp > 1 else "1f1b")

    @property
    def v_shape(self) -> bool:
        """Whether the two model chunks of each rank sit in ZB-V's V (virtual stage r and 2pp-1-r)
        rather than interleaved (r and pp + r)."""
        return self.schedule == "zbv"

    @property
    def microbatch_group_size(self) -> int:
        """Microbatches the interleaved schedule runs per chunk in a row (default pp)."""
        group = self.microbatch_group_size_per_virtual_pipeline_stage
        return self.pipeline_model_parallel_size if group is None else group

    def validate(self) -> None:
        require_positive(self, "tensor_model_parallel_size", "context_parallel_size", "pipeline_model_parallel_size",
                         "expert_model_parallel_size",
                         "data_parallel_size", "distributed_timeout_minutes", "ddp_bucket_size")
        require(self.cp_comm_type in CP_COMM_TYPES,
                f"--cp-comm-type={self.cp_comm_type} is unknown; allowed: {', '.join(CP_COMM_TYPES)}")
        require(self.data_parallel_mode in DATA_PARALLEL_MODES, f"--data-parallel-mode={self.data_parallel_mode} "
                f"is unknown; allowed: {', '.join(DATA_PARALLEL_MODES)}")
        strategy = self.data_parallel_sharding_strategy
        if strategy is not None:
            require(strategy in SHARDING_STRATEGIES, f"--data-parallel-sharding-strategy={strategy} is unknown; "
                    f"allowed: {', '.join(SHARDING_STRATEGIES)}")
            require(strategy != "no_shard" or not self.use_distributed_optimizer,
                    "--data-parallel-sharding-strategy=no_shard contradicts --use-distributed-optimizer")
        require(not self.overlap_param_gather or self.sharded_optimizer,
                "--overlap-param-gather needs --use-distributed-optimizer (only sharded parameters are gathered)")
        require(not self.overlap_param_gather or self.sharding != "optim_grads_params",
                "--overlap-param-gather is for optim and optim_grads; optim_grads_params gathers each layer's "
                "parameters before it runs anyway, the next layer's in the background")
        if self.virtual_pipeline_model_parallel_size is not None:
            require_positive(self, "virtual_pipeline_model_parallel_size")
        pp, vpp = self.pipeline_model_parallel_size, self.vpp
        require(self.schedule in SCHEDULES,
                f"--pipeline-schedule={self.schedule} is unknown; allowed: {', '.join(SCHEDULES)}")
        require(vpp == 1 or pp > 1, f"--virtual-pipeline-model-parallel-size={vpp} needs "
                                     f"--pipeline-model-parallel-size > 1 (it is {pp})")
        require(vpp == 1 or self.schedule in ("interleaved", "zbv"),
                f"--pipeline-schedule={self.schedule} cannot run {vpp} model chunks per rank; "
                "use --pipeline-schedule interleaved or zbv (or leave it unset)")
        require(self.schedule != "zbv" or vpp == 2,
                f"--pipeline-schedule=zbv places two model chunks per rank in a V; set "
                f"--virtual-pipeline-model-parallel-size 2 (it is {vpp})")
        require(self.schedule != "interleaved" or vpp > 1,
                "--pipeline-schedule=interleaved needs --virtual-pipeline-model-parallel-size > 1")
        group = self.microbatch_group_size_per_virtual_pipeline_stage
        if group is not None:
            require_positive(self, "microbatch_group_size_per_virtual_pipeline_stage")
            require(self.schedule == "interleaved", f"--microbatch-group-size-per-virtual-pipeline-stage={group} is "
                    "for the interleaved schedule only (--virtual-pipeline-model-parallel-size > 1)")

    def validate_model(self, model: ModelConfig) -> None:
        """The model must split evenly over the tensor- and pipeline-parallel groups."""
        pp, vpp = self.pipeline_model_parallel_size, self.vpp
        require(model.num_layers % (pp * vpp) == 0,
                f"--num-layers={model.num_layers} is not divisible by pp*vpp={pp}*{vpp}={pp * vpp}")
        tp = self.tensor_model_parallel_size
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            value = getattr(model, name)
            require(value % tp == 0, f"{flag(name)}={value} is not divisible by --tensor-model-parallel-size={tp}")
        if self.sequence_parallel:
            require(model.seq_length % tp == 0,
                    f"--seq-length={model.seq_length} is not divisible by --tensor-model-parallel-size={tp}, "
                    "which --sequence-parallel needs")
        ep = self.expert_model_parallel_size
        if ep > 1:
            require(model.num_experts is not None, f"--expert-model-parallel-size={ep} needs --num-experts")
            require(model.num_experts % ep == 0,
                    f"--num-experts={model.num_experts} is not divisible by --expert-model-parallel-size={ep}")
        cp = self.context_parallel_size
        if cp > 1:
            # The sequence is cut into 2*cp chunks (each rank holds two, for causal load balance),
            # and under SP the rank's tokens are cut again over tp.
            chunks = 2 * cp * (tp if self.sequence_parallel else 1)
            require(model.seq_length % chunks == 0,
                    f"--seq-length={model.seq_length} is not divisible by 2 x --context-parallel-size={cp}"
                    + (f" x --tensor-model-parallel-size={tp} (sequence parallel)" if self.sequence_parallel else "")
                    + f" = {chunks}")
            if self.cp_comm_type == "a2a":
                for name in ("num_attention_heads", "num_query_groups"):
                    value = getattr(model, name)
                    require(value % (tp * cp) == 0,
                            f"{flag(name)}={value} is not divisible by tp x cp = {tp * cp}, which "
                            "--cp-comm-type=a2a needs (each rank takes whole heads)")
            require(model.attention_dropout == 0.0,
                    f"--attention-dropout={model.attention_dropout} is not supported with "
                    f"--context-parallel-size={cp}; use 0")
