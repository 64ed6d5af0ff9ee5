"""Settings: pydantic models, settable from the environment with prefix ``ELBERT_``.

Nested fields use ``__``: ``ELBERT_KAFKA__BOOTSTRAP_SERVERS=broker:9092``,
``ELBERT_EXIT__TAU=0.2``. One ``Settings`` object is built at the edge (CLI, Serve replica)
and passed explicitly; nothing reads the environment at import time.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SHIPPED_MODEL = "bbc-elbert"  # inside the package (elbert_stream/models/): used when model.path is None
PolicyName = Literal["confidence_window", "entropy", "patience", "none"]


class ModelSettings(BaseModel):
    path: str | None = Field(None, description="ALBERT/ELBERT checkpoint dir; None = the shipped BBC model")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = float32 on CPU, bfloat16 on CUDA"
    )
    max_length: int = Field(128, ge=8, description="truncation length in tokens (<= model max positions)")
    compile: bool = Field(False, description="torch.compile the shared layer (CUDA only pays off)")


def model_dir(path: str | None) -> Path:
    """The checkpoint directory ``ModelSettings.path`` names (None = the shipped model's folder)."""
    if path is not None:
        return Path(path)
    return Path(str(resources.files("elbert_stream") / "models" / SHIPPED_MODEL))


class ExitSettings(BaseModel):
    """The exit rule and its thresholds: the one shape, wherever exit settings appear (``Settings.exit``,
    ``reconfigure``'s ``exit`` section, the defaults saved with a model as ``config.elbert.exit``, the
    engine's ``ExitPolicy``). ``None`` takes the model's saved value (``over``)."""

    policy: PolicyName | None = Field(
        None, description="confidence_window (ELBERT), entropy, patience (PABEE) or none; unset = the "
        "model's saved policy (the shipped model's: confidence_window)"
    )
    tau: float | None = Field(None, ge=0.0, le=1.0, description="normalised-entropy threshold (stage 1)")
    window: int | None = Field(None, ge=1, description="confidence window length in depths (stage 2)")
    patience: int | None = Field(None, ge=1, description="PABEE patience (policy=patience)")
    require_rising: bool | None = Field(None, description="stage 2 also needs non-falling top probability")
    min_depth: int | None = Field(None, ge=1, description="no exit before this depth")

    def over(self, defaults: ExitSettings) -> ExitSettings:
        """These settings with every ``None`` field taken from ``defaults``."""
        mine = {k: v for k, v in self.model_dump().items() if v is not None}
        return ExitSettings.model_validate({**defaults.model_dump(), **mine})

    def unset(self) -> list[str]:
        """Names of the fields left to a model's defaults."""
        return [k for k, v in self.model_dump().items() if v is None]


# a model's exit defaults when its config has no (or a partial) ``elbert.exit`` block
MODEL_EXIT_DEFAULTS = ExitSettings(policy="confidence_window", tau=0.1, window=3, patience=3,
                                   require_rising=False, min_depth=1)


class EngineSettings(BaseModel):
    """The continuous-batching engine; see docs/engine.md."""

    mode: Literal["continuous", "compaction", "naive"] = Field(
        "continuous", description="continuous = refill free slots every step (the product); the other two "
        "are the benchmark's baselines"
    )
    max_slots: int = Field(64, ge=1, description="samples in flight at once (rows of the slot table)")
    max_batch_tokens: int = Field(8192, ge=8, description="sum of token lengths over busy slots")
    max_queue: int = Field(1024, ge=1, description="waiting requests before add() reports full")
    cpu_row_chunk: int = Field(
        16, ge=0, description="on CPU a step's layer call runs its rows in chunks of this many (cache-sized "
        "matmuls, ~17 % faster at 64 rows; results unchanged); 0 = all rows at once; CUDA: always at once"
    )
    layer_precision: Literal["model", "bfloat16", "int8"] = Field(
        "model", description="arithmetic of the shared layer: model = the model dtype; bfloat16 = bf16 "
        "weights and hidden states (CPUs with avx512_bf16/AMX, CUDA); int8 = dynamic int8 quantisation of "
        "its Linear modules (CPU, float32 model). Embeddings and exit head stay in the model dtype; label "
        "agreement with float32: docs/engine.md, `elbert-stream evaluate --precision`"
    )


class KafkaSettings(BaseModel):
    """Kafka source and sink; see docs/streaming.md. Secrets are SecretStr: never logged or exported."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="comma-separated host:port list")
    bootstrap_timeout_ms: int = Field(
        30_000, ge=1000,
        description="how long a client tries to reach the cluster at start (ms); then the replica fails "
                    "with KafkaUnreachable naming the cause (wrong address, credentials, CA)",
    )
    input_topics: list[str] = Field(default_factory=lambda: ["elbert-input"], description="topics to consume")
    output_topic: str = Field("elbert-output", description="one versioned JSON record per input")
    dead_letter_topic: str = Field("elbert-dead-letter", description="original bytes + reason headers")
    group_id: str = Field("elbert-stream", description="consumer group shared by all replicas")
    group_instance_id: str | None = Field(
        None, description="static membership id; the Serve replica sets one per replica"
    )
    lag_from: Literal["list_offsets", "fetch_high_watermark"] = Field(
        "list_offsets", description="consumer lag = end offset - position, the end offset from ListOffsets "
        "(read_committed: the last stable offset; asked every second off the loop thread, fresh while "
        "paused) or from the last fetch's high watermark (for a broker whose ListOffsets is wrong: Tansu 0.6)"
    )
    leave_group_on_close: bool = Field(
        True, description="a clean stop (drain) sends LeaveGroup, static members too (by group.instance.id, "
        "KIP-345), so the group rebalances at once; False: a departed static member's partitions wait for "
        "the same id to return until session_timeout_ms (a restart needs no rebalance, a scale-down stalls)"
    )
    input_format: Literal["text", "json", "auto"] = Field(
        "auto", description="text = UTF-8 value; json = {'text':..,'id':..}; auto = json if it parses"
    )
    max_message_bytes: int = Field(1_000_000, ge=1, description="larger values are dead-lettered (bytes)")
    max_text_chars: int = Field(100_000, ge=1, description="longer texts are dead-lettered")
    session_timeout_ms: int = Field(10_000, ge=1000, description="consumer group session timeout (ms)")
    heartbeat_interval_ms: int = Field(2_000, ge=100, description="consumer heartbeat period (ms)")
    max_poll_records: int = Field(
        256, ge=1, description="records per poll, and the most polled messages on their way to the engine "
        "(the backlog; at this bound every partition pauses); the results channel holds this + max_slots"
    )
    fetch_max_bytes: int = Field(
        16 * 1024 * 1024, ge=1024,
        description="bytes one fetch may return (bounds the consumer's buffer); a larger record comes whole",
    )
    receive_message_max_bytes: int = Field(
        100_000_000, ge=1_000_000,
        description="largest response the consumer accepts (bytes; kafka-python's limit): keep it above the "
        "largest batch the input topics allow (max.message.bytes), or fetching stops at such a record",
    )
    poll_timeout_ms: int = Field(20, ge=0, description="poll wait when the engine is idle (ms)")
    commit_interval_s: float = Field(
        1.0, gt=0, description="offset commit period (s); bounds duplicates after a crash"
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where a group with no committed offset starts"
    )
    delivery: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once", description="exactly_once = transactions; read the output with read_committed"
    )
    transactional_id_prefix: str = Field(
        "elbert-stream", description="exactly_once: transactional.id = prefix + the worker's stable identity "
        "(stream/identity.py: Serve rank, or host slot), so a replacement fences its predecessor"
    )
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="producer compression of output and dead-letter batches"
    )
    linger_ms: int = Field(
        2, ge=0, description="producer linger.ms for outputs and dead letters: how long a batch waits for "
        "more records (ms). Larger means fewer, fuller batches (less broker work per answer) at that much "
        "more latency"
    )
    delivery_timeout_ms: int = Field(
        120_000, ge=1000, description="producer retries a send this long (ms); past it the worker fails"
    )
    transaction_timeout_ms: int = Field(
        20_000, ge=1000,
        description="exactly_once: the broker aborts a transaction open this long (ms), e.g. a killed "
                    "replica's whose transactional id does not come back; read_committed readers wait at "
                    "most this long for it. Longer than one commit takes, shorter than a stall you accept",
    )
    max_block_ms: int = Field(
        5_000, ge=0,
        description="longest a produce call may block the output stage (ms): output-topic metadata unknown "
                    "or the producer's buffer full; past it the record is parked and retried, its partition "
                    "paused",
    )
    commit_timeout_ms: int = Field(
        5_000, ge=100,
        description="longest a blocking offset commit waits (ms; at drain, close and revoke); the intake's "
                    "periodic commits are asynchronous and never block it",
    )
    retry_backoff_max_s: float = Field(
        30.0, gt=0,
        description="a parked record (dead-letter topic not writable, produce blocked) is retried with "
                    "exponential backoff up to this period (s) until it goes through",
    )
    # security
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="SASL_* needs the sasl_* settings; *SSL uses the ssl_* settings"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism"
    )
    sasl_username: str | None = Field(None, description="SASL user")
    sasl_password: SecretStr | None = Field(None, description="SASL password (secret)")
    ssl_cafile: str | None = Field(None, description="CA bundle (PEM) that signed the brokers' certificates")
    ssl_certfile: str | None = Field(None, description="client certificate (PEM) for mutual TLS")
    ssl_keyfile: str | None = Field(None, description="client private key (PEM) for mutual TLS")
    ssl_password: SecretStr | None = Field(None, description="password of the client key (secret)")
    ssl_check_hostname: bool = Field(True, description="verify the broker's hostname against its certificate")

    @model_validator(mode="after")
    def _check_sasl(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                f"security_protocol={self.security_protocol!r} needs sasl_mechanism, sasl_username "
                "and sasl_password"
            )
        return self


class TelemetrySettings(BaseModel):
    """Metrics and traces; see docs/telemetry.md. Nothing here is ever recorded in a span or metric."""

    prometheus_port: int | None = Field(
        None, ge=0, le=65535, description="serve /metrics here; 0 = pick a free port; None = off"
    )
    prometheus_host: str = Field("0.0.0.0", description="bind address of /metrics (127.0.0.1 = local only)")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP base URL for metrics and traces (/v1/metrics, /v1/traces appended)"
    )
    otlp_headers: SecretStr | None = Field(
        None, description="'k1=v1,k2=v2' sent with every OTLP request (e.g. auth); never logged"
    )
    otlp_export_interval_s: float = Field(10.0, gt=0, description="OTLP metric push period, seconds")
    trace_sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0, description="parent-based: the producer's sampled flag wins; ratio for roots"
    )
    service_name: str = Field("elbert-stream", description="OpenTelemetry service.name")


class AutoscalingSettings(BaseModel):
    target_utilization: float = Field(0.7, gt=0, le=1.0, description="fraction of measured capacity")
    drain_time_s: float = Field(30.0, gt=0, description="backlog must drain within this time")
    scale_down_delay_s: float = Field(60.0, ge=0, description="hysteresis before removing replicas")
    scale_down_headroom: float = Field(0.8, gt=0, le=1.0, description="scale down only below this share")


class AdaptiveSettings(BaseModel):
    """Load-adaptive exit (gears): under a backlog the replica loosens its exit thresholds along the
    model's gear table (``gears.json`` beside the model), within an accuracy budget, and returns to the
    default gear when the backlog is gone; see docs/adaptive.md. Changeable live (``reconfigure``)."""

    enabled: bool = Field(False, description="run the gear controller; off = the exit settings stay fixed")
    latency_target_ms: float = Field(
        2000.0, gt=0, description="latency a message may see in the replica (ms): one gear up when the "
        "expected latency ((queue + lag + in slots) / output rate) or the oldest waiting message's age "
        "reaches up_at x this; set it well above the replica's latency at normal load"
    )
    max_accuracy_loss_points: float | None = Field(
        1.5, ge=0, description="budget: gears more than this many accuracy points below the default gear "
        "(on the validation split in gears.json) are never used; None = no limit"
    )
    min_consistency: float | None = Field(
        None, ge=0, le=1, description="budget: gears whose labels agree with full depth less often than this "
        "share (validation) are never used; None = no limit"
    )
    up_at: float = Field(0.5, gt=0, description="one gear up when pressure (latency / target) reaches this")
    down_at: float = Field(
        0.1, ge=0, description="one gear down after the wait for a slot ((queue + lag) / output rate) stayed "
        "at or below this x latency_target for settle_s, with the pressure below up_at"
    )
    settle_s: float = Field(5.0, ge=0, description="calm needed before each shift down (s): the hysteresis")
    min_dwell_s: float = Field(1.0, ge=0, description="at least this long between two shifts up (s)")

    @model_validator(mode="after")
    def _check_band(self) -> AdaptiveSettings:
        if self.down_at >= self.up_at:
            raise ValueError(f"adaptive.down_at ({self.down_at}) must be below adaptive.up_at "
                             f"({self.up_at}): the band between them is the controller's hysteresis")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ELBERT_", env_nested_delimiter="__", extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings)
    exit: ExitSettings = Field(default_factory=ExitSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    adaptive: AdaptiveSettings = Field(default_factory=AdaptiveSettings)
