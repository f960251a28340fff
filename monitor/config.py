"""YAML configuration into typed, validated dataclasses.

Every mistake is reported as one line naming the file, the key path and the value
(``site.yaml: scoring.k: must be >= 1, got 0``), and the whole file is checked before anything
starts, so a bad config never half-starts the daemon. Unknown keys are errors, not warnings: a
misspelt key silently falling back to its default is how a plant ends up unmonitored.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from monitor.errors import ConfigError

DEFAULT_STATE_DIR = "/var/lib/asd-monitor"
DEFAULT_CONDITION = "default"  # the operating condition of windows enrolled without one

# The choices the schema offers; the modules that implement them take their lists from here
# (knn.METRICS, knn.INDEX_TYPES, ranking.RULES, backbone.PROVIDERS, messages.ALERT_RULES), so no
# list is written twice.
Metric = Literal["cosine", "euclidean", "std-euclidean", "mahalanobis"]  # KNN distances
IndexType = Literal["auto", "flat", "hnsw"]  # faiss index per condition
FusionRule = Literal["mean", "max", "zmin"]  # how backbones' scores combine
Normalisation = Literal["none", "density"]  # KNN distance as is, or in units of the local spread
Provider = Literal["auto", "cpu", "cuda"]  # onnxruntime execution provider
AlertRule = Literal["n_of_m", "cusum"]  # what raises an alert (also named in its payload)
WindowPhase = Literal["spread", "aligned"]  # machines' windows end at staggered instants, or together


def _range(minimum: float | None = None, maximum: float | None = None, exclusive_min: bool = False) -> dict:
    return {"min": minimum, "max": maximum, "exclusive_min": exclusive_min}


@dataclass(frozen=True)
class BackboneConfig:
    """One backbone: a built-in name (``aisfx``, ``logmel``) or a path to an exported .onnx.

    ``output`` takes a further embedding the model file carries instead of its first one (the
    built-in aisfx: ``block2``, ``block3``, its intermediate conv blocks, time-pooled); the
    backbone is then named ``<model name>.<output>`` (``aisfx.block3``). Outputs joined by ``+``
    are concatenated, each L2-normalised (``embedding+block3``: aisfx's own embedding and its
    block 3, named ``aisfx.embedding-block3``). Entries naming the same file share one
    inference per window. Which outputs exist is checked when the model is opened
    (``check-config``, start): a name the file lacks is a config error listing them.
    """

    model: str
    weight: float = field(default=1.0, metadata=_range(0.0))
    # Overrides scoring.metric for this backbone (a DSP feature may want cosine, a CNN mahalanobis).
    metric: Metric | None = None
    output: str | None = None

    @property
    def key(self) -> str:
        """What must be unique among the backbones: the model, and the output when one is named."""
        return self.model if self.output is None else f"{self.model} output {self.output}"


@dataclass(frozen=True)
class ScoringConfig:
    """KNN scoring. ``mahalanobis`` whitens with the bank's covariance shrunk towards its
    diagonal by ``shrinkage`` (1.0 is the standardised Euclidean distance): measured best on
    both benchmark sets for every shrinkage from 0.3 to 0.8 (see README)."""

    metric: Metric = "mahalanobis"
    k: int = field(default=1, metadata=_range(1))
    shrinkage: float = field(default=0.5, metadata=_range(0.0, 1.0, exclusive_min=True))
    # Per condition sub-bank: exact below 100 000 embeddings, HNSW above (monitor/scoring/knn.py).
    index: IndexType = "auto"
    # The leave-one-out reference costs O(n^2): above this many bank windows it is computed
    # exactly for an evenly spread sample of this many (measured: 1e4 windows take 20-30 s).
    reference_max_windows: int = field(default=5000, metadata=_range(2))
    # With site noise enrolled: a window is idle (machine stopped) when its distance to the
    # noise is at most this share of its distance to the running machine (monitor/scoring/idle.py).
    idle_margin: float = field(default=0.5, metadata=_range(0.0, 1.0, exclusive_min=True))
    # density: each distance divided by the mean own-distance (leave-one-out, within the
    # condition) of the neighbours it was measured to (monitor/scoring/knn.py). The default with
    # aisfx's embedding+block3: it helped on one benchmark set and held on the other (README).
    normalisation: Normalisation = "density"


@dataclass(frozen=True)
class FusionConfig:
    """How per-backbone scores are combined: ``mean``/``max`` of ranks, or ``zmin``, the minimum
    over backbones of each raw score z-normalised by its bank's leave-one-out scores, ranked
    against the same minimum of the bank's leave-one-out scores (monitor/scoring/ranking.py)."""

    rule: FusionRule = "mean"


DEFAULT_WARNING_THRESHOLD = 0.95  # alerts.warning_threshold "auto", see AlertConfig.warning_rank


@dataclass(frozen=True)
class AlertConfig:
    """When windows become an alert.

    A window is anomalous when its fused rank exceeds ``threshold`` (0.99: above 99 % of what
    normal audio scored). An alert is raised when ``raise_count`` of the last ``raise_window``
    windows were anomalous (one odd window is not a fault), and cleared after ``clear_count``
    consecutive windows below ``clear_threshold``. After a clear, no new alert is raised for
    ``cooldown_seconds``, so a machine hovering at the threshold does not flood the plant.

    ``rule: cusum`` raises instead by a CUSUM on ``-log(1 - rank)`` (monitor/service/alerts.py),
    which catches a fault holding ranks at 0.93-0.97 that N-of-M at 0.99 waits for. Its alarm
    level is derived, not tuned: ``cusum_arl_days`` is the mean time between false alarms on
    normal audio at the configured hop (30 days: about a dozen a year per machine), and
    ``cusum_drift`` the per-window evidence subtracted (2.0: midway between normal audio's mean
    of 1 and the 3.0 of a fault at rank 0.95). Clearing and cooldown are the same for both
    rules. The default stays ``n_of_m`` until measurements justify a switch.

    ``warning_threshold`` adds a level below the alert (monitor/service/severity.py): a machine
    without an open alert reads ``warning`` while ``raise_count`` of the last ``raise_window``
    windows ranked above it. It must lie in [``clear_threshold``, ``threshold``): below the
    clear threshold it would flag windows the reference learns from as normal. ``auto`` (the
    default) is 0.95 where that fits, null turns the level off. A warning never raises an alert.
    """

    threshold: float = field(default=0.99, metadata=_range(0.0, 1.0, exclusive_min=True))
    raise_count: int = field(default=3, metadata=_range(1))
    raise_window: int = field(default=5, metadata=_range(1))
    clear_threshold: float = field(default=0.9, metadata=_range(0.0, 1.0, exclusive_min=True))
    clear_count: int = field(default=6, metadata=_range(1))
    cooldown_seconds: float = field(default=300.0, metadata=_range(0.0))
    rule: AlertRule = "n_of_m"
    cusum_arl_days: float = field(default=30.0, metadata=_range(0.0, exclusive_min=True))
    cusum_drift: float = field(default=2.0, metadata=_range(0.0, exclusive_min=True))
    # The warning level (monitor/service/severity.py): the N-of-M count above this lower rank.
    # "auto": DEFAULT_WARNING_THRESHOLD when it lies in [clear_threshold, threshold), else midway
    # between them (so a site that lowered ``threshold`` keeps a valid config); null: no warnings.
    warning_threshold: Literal["auto"] | float | None = field(default="auto", metadata=_range(0.0, 1.0, exclusive_min=True))

    @property
    def warning_rank(self) -> float | None:
        """The rank the warning level counts above (``warning_threshold`` resolved); None: off."""
        if self.warning_threshold != "auto":
            return self.warning_threshold  # type: ignore[return-value]
        if self.clear_threshold <= DEFAULT_WARNING_THRESHOLD < self.threshold:
            return DEFAULT_WARNING_THRESHOLD
        middle = 0.5 * (self.clear_threshold + self.threshold)
        return middle if middle < self.threshold else None  # clear_threshold == threshold: no room


@dataclass(frozen=True)
class ReferenceConfig:
    """The rolling part of the rank reference: recent windows that did not alarm."""

    rolling_size: int = field(default=360, metadata=_range(0))


@dataclass(frozen=True)
class SensorConfig:
    """Sensor checks run on every window before it is scored; a faulty window is never 'normal'."""

    silence_dbfs: float = -90.0  # RMS below this: digital silence / dead microphone
    level_drop_db: float = field(default=30.0, metadata=_range(0.0))  # this far below the enrolled level
    clip_level: float = field(default=0.999, metadata=_range(0.0, 1.0, exclusive_min=True))
    clip_fraction: float = field(default=0.001, metadata=_range(0.0, 1.0, exclusive_min=True))
    dropout_ms: float = field(default=50.0, metadata=_range(0.0, exclusive_min=True))  # run of exact zeros


@dataclass(frozen=True)
class SourceConfig:
    """Where audio comes from. ``microphone``: a sounddevice input (device by name or index,
    None = the system default). ``file``: WAV/FLAC files or folders replayed as a stream."""

    name: str
    type: Literal["microphone", "file"]
    device: str | int | None = None  # a name (substring match) or an index
    sample_rate: int = field(default=16000, metadata=_range(1000))
    channels: int = field(default=1, metadata=_range(1))
    block_size: int = field(default=1600, metadata=_range(16))
    paths: list[Path] = field(default_factory=list)
    speed: float = field(default=1.0, metadata=_range(0.0, exclusive_min=True))  # 0 < speed; inf not allowed
    loop: bool = False


@dataclass(frozen=True)
class MachineConfig:
    """One monitored machine: a channel of a source, with its own bank, reference and alerts."""

    name: str
    source: str
    channel: int = field(default=0, metadata=_range(0))
    bank: Path | None = None  # default: <state_dir>/banks/<name>

    def bank_dir(self, state_dir: Path) -> Path:
        """Where this machine's bank lives (``bank``, default ``<state_dir>/banks/<name>``)."""
        return self.bank or state_dir / "banks" / self.name


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class MqttConfig:
    """MQTT output. The password is read from ``password_file`` or the environment variable
    named by ``password_env``, never from this file, and is never logged."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = field(default=1883, metadata=_range(1, 65535))
    client_id: str | None = None
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)
    keepalive: int = field(default=30, metadata=_range(5, 65535))  # MQTT's keepalive is a 16-bit field
    topic_prefix: str = "asd"
    site: str = "default"
    publish_scores: bool = True
    homeassistant_discovery: bool = False
    discovery_prefix: str = "homeassistant"
    outbox_max_messages: int = field(default=100000, metadata=_range(10))
    # Commands on <prefix>/<site>/<machine>/cmd/enroll: off unless enabled; the broker's own
    # authentication and ACLs decide who may publish there, and a token file adds a shared secret.
    commands: bool = False
    command_token_file: Path | None = None
    # With discovery and commands on, Home Assistant gets buttons that answer the last alert. Its
    # discovery payloads are retained for any subscriber to read, so a token never goes in them:
    # with a token file, the buttons read the token from this Home Assistant entity (e.g. an
    # input_text in password mode holding it), and without one there are no buttons.
    homeassistant_token_entity: str | None = None


@dataclass(frozen=True)
class SparkplugConfig:
    """A Sparkplug B edge node (monitor/outputs/sparkplug.py, the optional extra ``sparkplug``):
    one edge node per daemon, one device per machine, on a second MQTT connection of its own
    (Sparkplug's NDEATH must be that connection's will). The broker and credentials are those of
    ``mqtt`` unless given here. ``group_id`` defaults to ``mqtt.site``, ``edge_node_id`` to
    ``daemon.name``."""

    enabled: bool = False
    group_id: str | None = None
    edge_node_id: str | None = None
    host: str | None = None
    port: int | None = field(default=None, metadata=_range(1, 65535))
    client_id: str | None = None  # default: spb-<edge node id>-<host name>
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    tls: TlsConfig | None = None

    @property
    def own_credentials(self) -> bool:
        """This section names a login of its own (else the node logs in as ``mqtt`` does)."""
        return self.username is not None or self.password_file is not None or self.password_env is not None

    def broker(self, mqtt: MqttConfig) -> MqttConfig:
        """``mqtt`` with this section's overrides: the connection settings the node uses."""
        credentials = self.own_credentials
        return dataclasses.replace(
            mqtt, host=self.host or mqtt.host, port=self.port or mqtt.port, tls=self.tls or mqtt.tls,
            username=self.username if credentials else mqtt.username,
            password_file=self.password_file if credentials else mqtt.password_file,
            password_env=self.password_env if credentials else mqtt.password_env)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = field(default=9464, metadata=_range(0, 65535))


@dataclass(frozen=True)
class WebConfig:
    """The local review page (monitor/web): off unless enabled, on loopback by default.

    Posting a verdict needs the token in ``token_file`` (sent as ``Authorization: Bearer``),
    read at each post like ``mqtt.command_token_file``; without ``token_file`` the page uses
    ``mqtt.command_token_file``, and with neither it is read-only. Unlike MQTT, where the
    broker's ACLs may be the only guard, nothing else stands between a local page and any
    process or browser tab on the box, so a page without a token never takes verdicts."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = field(default=9465, metadata=_range(0, 65535))  # 0: any free port (tests)
    token_file: Path | None = None


@dataclass(frozen=True)
class ClipsConfig:
    """Audio of alarming windows, saved as FLAC for the technician, within a retention bound."""

    enabled: bool = True
    max_files: int = field(default=500, metadata=_range(1))
    max_megabytes: float = field(default=500.0, metadata=_range(0.0, exclusive_min=True))


@dataclass(frozen=True)
class ScheduleConfig:
    """A daily live enrollment at a time the machine is known to be healthy (local time)."""

    machine: str
    daily_at: str  # "HH:MM"
    duration_seconds: float = field(default=600.0, metadata=_range(0.0, exclusive_min=True))
    condition: str = DEFAULT_CONDITION


@dataclass(frozen=True)
class EnrollmentConfig:
    """Live enrollment from the daemon's own audio (see monitor/enrollment/live.py)."""

    min_windows: int = field(default=6, metadata=_range(2))  # refuse to save fewer clean windows
    outlier_rank: float = field(default=0.99, metadata=_range(0.0, 1.0, exclusive_min=True))
    default_duration_seconds: float = field(default=600.0, metadata=_range(0.0, exclusive_min=True))
    conditions: list[str] = field(default_factory=list)  # allowed condition names; empty = any
    schedule: list[ScheduleConfig] = field(default_factory=list)
    control_socket: bool = True  # <state_dir>/control.sock for `asd-monitor enroll-live`


@dataclass(frozen=True)
class DaemonConfig:
    name: str = "asd-monitor"
    # None: systemd's $STATE_DIRECTORY (StateDirectory=), else /var/lib/asd-monitor.
    state_dir: Path | None = None
    # Every hop is one backbone inference per machine: below 0.1 s (10 windows a second per
    # machine) the worker falls behind and the queue drops windows, and a hop shorter than one
    # sample rounds to no audio at all.
    hop_seconds: float = field(default=10.0, metadata=_range(0.1))
    # Windows waiting for the scorer; 0 = max(8, 2 x machines): every hop delivers one window
    # per machine at once, so a fixed small queue drops windows on a box with many machines.
    queue_size: int = field(default=0, metadata=_range(0))
    # spread: machine i of N ends its windows i x hop / N after machine 0, so the windows of
    # many machines reach the workers one by one rather than in one burst per hop (latency is
    # then one window's processing, not N); aligned: every window of a source ends together.
    window_phase: WindowPhase = "spread"
    # Threads that score windows (0 = chosen from the core count, see
    # monitor/service/capacity.py); each machine's windows stay in order whatever the number.
    workers: int = field(default=0, metadata=_range(0))
    event_log: Path | None = None  # default: <state_dir>/events.jsonl
    # Who may read what the daemon and the enroll commands write (events, outbox, clips, banks):
    # the owner only (umask 077, as the systemd unit's UMask=0077), or its group too (027).
    file_mode: Literal["private", "group"] = "private"

    def umask(self) -> int:
        return 0o027 if self.file_mode == "group" else 0o077

    def resolved_queue_size(self, machines: int) -> int:
        return self.queue_size or max(8, 2 * machines)

    def resolved_event_log(self) -> Path:
        """The JSONL event log (``event_log``, default ``<state_dir>/events.jsonl``)."""
        return self.event_log or self.resolved_state_dir() / "events.jsonl"

    def resolved_state_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        from_systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        return Path(from_systemd or DEFAULT_STATE_DIR)


@dataclass(frozen=True)
class RuntimeConfig:
    provider: Provider = "auto"
    # onnxruntime intra-op threads per call; 0: in the daemon, cores / workers (one per call
    # with the default workers, see monitor/service/capacity.py), elsewhere onnxruntime's choice.
    threads: int = field(default=0, metadata=_range(0))
    # numpy BLAS and faiss OpenMP threads in every daemon thread (0 = the libraries' default);
    # one is measured fastest for one window at a time (see monitor/service/threads.py).
    compute_threads: int = field(default=1, metadata=_range(0))


OpcUaSecurity = Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"]


@dataclass(frozen=True)
class OpcUaConfig:
    """The OPC UA server for SCADA/MES (monitor/outputs/opcua.py, the optional extra ``opcua``).

    Off unless enabled, on loopback by default: a plant network reaches it only when the
    endpoint says so. The password is read from ``password_file``, never from this file;
    anonymous sessions only with ``allow_anonymous``. With ``security_policy: None`` a password
    crosses the network in clear, so a non-loopback endpoint wants a Basic256Sha256 policy
    (which needs ``certificate_file`` and ``private_key_file``)."""

    enabled: bool = False
    endpoint: str = "opc.tcp://127.0.0.1:4840/asd/"  # port 0: any free port (tests)
    namespace: str = "urn:asd-monitor:opcua"
    security_policy: OpcUaSecurity = "None"
    certificate_file: Path | None = None  # DER or PEM
    private_key_file: Path | None = None  # PEM
    username: str | None = None
    password_file: Path | None = None
    allow_anonymous: bool = False


def _default_backbones() -> list[BackboneConfig]:
    # aisfx's embedding and its third block from one inference (README: detection).
    return [BackboneConfig("aisfx", output="embedding+block3")]


@dataclass(frozen=True)
class Config:
    backbones: list[BackboneConfig] = field(default_factory=_default_backbones)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    sensor: SensorConfig = field(default_factory=SensorConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    sources: list[SourceConfig] = field(default_factory=list)
    machines: list[MachineConfig] = field(default_factory=list)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    clips: ClipsConfig = field(default_factory=ClipsConfig)
    enrollment: EnrollmentConfig = field(default_factory=EnrollmentConfig)
    web: WebConfig = field(default_factory=WebConfig)
    opcua: OpcUaConfig = field(default_factory=OpcUaConfig)
    sparkplug: SparkplugConfig = field(default_factory=SparkplugConfig)


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one YAML mapping, with both lines."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"line {line}: key {key!r} given twice (first at line {first_line})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping. PyYAML keeps the last one
    silently, so an edit appended below an old setting would win without a word while the
    reader of the file sees the first one. Keys taken in with a ``<<`` merge may still be
    overridden: that is what a merge is for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise _DuplicateKey(key, line, first[key])
                first[key] = line
            except TypeError:  # an unhashable key: the SafeLoader's own error names it
                pass
        return super().construct_mapping(node, deep)


def load_config(path: Path) -> Config:
    """Read and validate a YAML file; an empty file gives the defaults."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{source}: line {line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data, no Python objects
    except _DuplicateKey as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: YAML syntax error{where}: {problem}") from None
    return config_from_dict(data if data is not None else {}, source)


def config_from_dict(data: Any, source: str = "<config>") -> Config:
    config = _build(Config, data, "", source)
    _check_config(config, source)
    return config


def _check_config(config: Config, source: str) -> None:
    if not config.backbones:
        raise ConfigError(f"{source}: backbones: at least one backbone is required")
    _check_unique(source, "backbones", [b.key for b in config.backbones])
    if all(b.weight == 0 for b in config.backbones):
        raise ConfigError(f"{source}: backbones: every weight is 0, nothing would be scored")
    alerts = config.alerts
    if alerts.raise_count > alerts.raise_window:
        raise ConfigError(f"{source}: alerts.raise_count: {alerts.raise_count} cannot exceed alerts.raise_window {alerts.raise_window}")
    if alerts.clear_threshold > alerts.threshold:
        raise ConfigError(f"{source}: alerts.clear_threshold: {alerts.clear_threshold:g} must not exceed alerts.threshold {alerts.threshold:g}")
    warning = alerts.warning_threshold
    if isinstance(warning, (int, float)) and warning >= alerts.threshold:
        raise ConfigError(f"{source}: alerts.warning_threshold: {warning:g} must be below alerts.threshold {alerts.threshold:g}")
    if isinstance(warning, (int, float)) and warning < alerts.clear_threshold:
        raise ConfigError(f"{source}: alerts.warning_threshold: {warning:g} must not be below alerts.clear_threshold {alerts.clear_threshold:g}")
    _check_unique(source, "sources", [s.name for s in config.sources])
    _check_unique(source, "machines", [m.name for m in config.machines])
    sources = {s.name: s for s in config.sources}
    for i, src in enumerate(config.sources):
        if src.type == "file" and not src.paths:
            raise ConfigError(f"{source}: sources[{i}].paths: a file source needs at least one path")
        for j, path in enumerate(src.paths):
            if not path.exists():
                raise ConfigError(f"{source}: sources[{i}].paths[{j}]: {path} does not exist")
    for i, machine in enumerate(config.machines):
        if machine.source not in sources:
            raise ConfigError(f"{source}: machines[{i}].source: unknown source {machine.source!r} (defined: {', '.join(sources) or 'none'})")
        if machine.channel >= sources[machine.source].channels:
            raise ConfigError(f"{source}: machines[{i}].channel: {machine.channel} but source {machine.source!r} has {sources[machine.source].channels} channel(s)")
    machine_names = {m.name for m in config.machines}
    for i, entry in enumerate(config.enrollment.schedule):
        if entry.machine not in machine_names:
            raise ConfigError(f"{source}: enrollment.schedule[{i}].machine: unknown machine {entry.machine!r}")
        if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", entry.daily_at):
            raise ConfigError(f"{source}: enrollment.schedule[{i}].daily_at: expected HH:MM, got {entry.daily_at!r}")
    mqtt = config.mqtt
    if config.web.token_file is not None and not config.web.token_file.is_file():
        raise ConfigError(f"{source}: web.token_file: {config.web.token_file} does not exist")
    if not config.web.host.strip():
        raise ConfigError(f"{source}: web.host: must name an address to listen on (e.g. 127.0.0.1)")
    if mqtt.command_token_file is not None and not mqtt.command_token_file.is_file():
        raise ConfigError(f"{source}: mqtt.command_token_file: {mqtt.command_token_file} does not exist")
    entity = mqtt.homeassistant_token_entity
    if entity is not None and not re.fullmatch(r"[a-z_]+\.[a-z0-9_]+", entity):
        raise ConfigError(f"{source}: mqtt.homeassistant_token_entity: expected a Home Assistant entity id "
                          f"such as input_text.asd_token, got {entity!r}")
    if mqtt.password_file is not None and not mqtt.password_file.is_file():
        raise ConfigError(f"{source}: mqtt.password_file: {mqtt.password_file} does not exist")
    if mqtt.password_file is not None and mqtt.password_env is not None:
        raise ConfigError(f"{source}: mqtt.password_env: give password_file or password_env, not both")
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(mqtt.tls, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"{source}: mqtt.tls.{key}: {path} does not exist")
    _check_opcua(source, config.opcua)
    _check_sparkplug(source, config.sparkplug)
    _check_topic(source, "daemon.name", config.daemon.name, one_level=True)
    _check_topic(source, "mqtt.site", mqtt.site, one_level=True)
    _check_topic(source, "mqtt.topic_prefix", mqtt.topic_prefix, one_level=False)
    _check_topic(source, "mqtt.discovery_prefix", mqtt.discovery_prefix, one_level=False)
    for i, machine in enumerate(config.machines):
        _check_topic(source, f"machines[{i}].name", machine.name, one_level=True)
        if machine.name != machine.name.strip():
            raise ConfigError(f"{source}: machines[{i}].name: {machine.name!r} must not have outer spaces")
    state_dir = config.daemon.resolved_state_dir()
    _check_location(source, "daemon.state_dir", state_dir, directory=True)
    _check_location(source, "daemon.event_log", config.daemon.resolved_event_log(), directory=False)
    _check_location(source, "daemon.state_dir", state_dir / "clips", directory=True)
    if mqtt.enabled:
        _check_location(source, "daemon.state_dir", state_dir / "outbox.sqlite", directory=False)
    for i, machine in enumerate(config.machines):
        _check_location(source, f"machines[{i}].bank", machine.bank_dir(state_dir), directory=True)


def _check_opcua(source: str, opcua: OpcUaConfig) -> None:
    """What can be known before the server starts; a certificate that does not load or a port
    that is taken is found when it starts (still before any audio)."""
    endpoint = urlsplit(opcua.endpoint)
    try:
        port = endpoint.port
    except ValueError:
        port = None
    if endpoint.scheme != "opc.tcp" or not endpoint.hostname or port is None:
        raise ConfigError(f"{source}: opcua.endpoint: expected opc.tcp://HOST:PORT/PATH, got {opcua.endpoint!r}")
    for key in ("certificate_file", "private_key_file", "password_file"):
        path = getattr(opcua, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"{source}: opcua.{key}: {path} does not exist")
    if opcua.security_policy != "None" and (opcua.certificate_file is None or opcua.private_key_file is None):
        raise ConfigError(f"{source}: opcua.security_policy: {opcua.security_policy} needs certificate_file and private_key_file")
    if (opcua.username is None) != (opcua.password_file is None):
        raise ConfigError(f"{source}: opcua.password_file: give username and password_file together")
    if opcua.enabled and opcua.username is None and not opcua.allow_anonymous:
        raise ConfigError(f"{source}: opcua.allow_anonymous: nobody could log in: set opcua.username and "
                          "opcua.password_file, or allow_anonymous: true")


def _check_sparkplug(source: str, sparkplug: SparkplugConfig) -> None:
    """Sparkplug ids are topic levels (no ``/``, ``+``, ``#``); files named must exist."""
    for key in ("group_id", "edge_node_id"):
        value = getattr(sparkplug, key)
        if value is not None:
            _check_topic(source, f"sparkplug.{key}", value, one_level=True)
    if sparkplug.password_file is not None and sparkplug.password_env is not None:
        raise ConfigError(f"{source}: sparkplug.password_env: give password_file or password_env, not both")
    files = {"password_file": sparkplug.password_file}
    files |= {f"tls.{key}": getattr(sparkplug.tls, key) for key in ("ca_file", "cert_file", "key_file")} if sparkplug.tls else {}
    for key, path in files.items():
        if path is not None and not path.is_file():
            raise ConfigError(f"{source}: sparkplug.{key}: {path} does not exist")


def _check_topic(source: str, key: str, value: str, one_level: bool) -> None:
    """A part of our MQTT topics. Wildcards (``+``, ``#``) and NUL are not allowed in a topic
    name (the broker would drop the connection on the first publish); the site, daemon and
    machine names are one level each, so no ``/`` either (``fan/1`` would shift every level a
    subscriber's filter counts on); a prefix may have several levels, but no empty one."""
    if any(c in value for c in "+#\0") or (one_level and "/" in value):
        allowed = "'+', '#', '/' or NUL (one MQTT topic level)" if one_level else "'+', '#' or NUL (MQTT wildcards)"
        raise ConfigError(f"{source}: {key}: {value!r} must not contain {allowed}")
    if "" in value.split("/"):
        raise ConfigError(f"{source}: {key}: {value!r} has an empty MQTT topic level (leading, trailing or double '/')")


def _check_location(source: str, key: str, path: Path, directory: bool) -> None:
    """A path the daemon writes: an existing one of the wrong type, or a missing one whose
    nearest existing ancestor is not a directory (so it can never be created), is an error now
    rather than a traceback once models are loaded. Whether the daemon's user may write there
    is left to the start: ``check-config`` often runs as another user than the daemon, and what
    it cannot look at (permissions) it does not judge."""
    try:
        if path.exists():
            if path.is_dir() != directory:
                expected = "a directory" if directory else "a file"
                raise ConfigError(f"{source}: {key}: {path} exists but is not {expected}")
            return
        ancestor = next(p for p in path.parents if p.exists())
    except OSError:
        return
    if not ancestor.is_dir():
        raise ConfigError(f"{source}: {key}: cannot create {path}: {ancestor} is not a directory")


def _check_unique(source: str, key: str, names: list[str]) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: {key}: name used twice: {', '.join(duplicates)}")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    label = where or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {label}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{source}: {prefix}{unknown[0]}: unknown key (allowed: {', '.join(sorted(known))})")
    values = {}
    for name, f in known.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            values[name] = _convert(hints[name], data[name], key, source, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {key}: required key is missing")
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, source: str, meta: typing.Mapping) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, source)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{source}: {key}: must be one of {', '.join(map(str, choices))}, got {_describe(value)}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {_describe(value)}")
        return [_convert(item, v, f"{key}[{i}]", source, meta) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        for candidate in args[:-1]:
            try:
                return _convert(candidate, value, key, source, meta)
            except ConfigError:
                continue
        return _convert(args[-1], value, key, source, meta)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {_describe(value)}")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and not isinstance(value, int)):
            kind = "an integer" if hint is int else "a number"
            raise ConfigError(f"{source}: {key}: expected {kind}, got {_describe(value)}")
        _check_range(float(value), key, source, meta)
        return hint(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {key}: expected a non-empty string, got {_describe(value)}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {key}: expected a path, got {_describe(value)}")
        return Path(value).expanduser()
    raise TypeError(f"config type {hint!r} at {key} is not supported")  # a programming error


def _check_range(value: float, key: str, source: str, meta: typing.Mapping) -> None:
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{source}: {key}: must be a finite number, got {value}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None:
        if meta.get("exclusive_min") and not value > low:
            raise ConfigError(f"{source}: {key}: must be > {low:g}, got {value:g}")
        if value < low:
            raise ConfigError(f"{source}: {key}: must be >= {low:g}, got {value:g}")
    if high is not None and value > high:
        raise ConfigError(f"{source}: {key}: must be <= {high:g}, got {value:g}")
