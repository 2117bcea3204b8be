"""What goes on the DHT: one key per (model, block), one signed subkey per serving peer.

Key:    "{dht_prefix}_block{i}"   (dht_prefix = model name @ digest of its weights, so a different
                                    or tampered checkpoint can never pose as the same model)
Subkey: "{peer id}[owner:{RSA public key}]"  (hivemind's RSASignatureValidator: only that key's
                                    holder can write it; the key is the peer's identity key)
Value:  ServerInfo as a map, checked against that same strict model by `ServerInfoValidator` on every node.

Records expire after `RECORD_TTL` seconds unless the peer refreshes them, so a peer that dies
without saying goodbye disappears on its own.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import re
from dataclasses import dataclass
from functools import partial
from typing import Annotated

from cryptography.hazmat.primitives import serialization
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPublicKey
from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from swarm.schema import Count, FiniteFloat, StrictModel, check_span, first_error
from swarm.tags import DTYPES, known_compression, known_dtype

logger = logging.getLogger(__name__)

RECORD_TTL = 60.0  # seconds a record lives without a refresh
MAX_BLOCKS = 2**16  # no model has more blocks; a record claiming more is malformed
MAX_RELAYS = 4  # relays one peer may announce
_REACH_DEFAULTS = {"relays": [], "reachable": True}  # ServerInfo fields a record carries only when they differ


class ServerState(str, enum.Enum):
    OFFLINE = "offline"
    JOINING = "joining"
    ONLINE = "online"


def _known_state(value: object) -> object:
    # the record carries the state's name as a string; nothing else converts (strict mode takes only members)
    return ServerState(value) if type(value) is str else value


Block = Annotated[int, Field(ge=0, le=MAX_BLOCKS)]


class ServerInfo(StrictModel):
    """A peer's announcement: in code, and (as `to_record()`) the DHT value every node validates."""

    state: Annotated[ServerState, BeforeValidator(_known_state)]
    start: Block
    end: Block
    throughput: Annotated[FiniteFloat, Field(ge=0.0)]  # block-steps per second
    dtype: str = Field(max_length=32)
    compression: str = Field(default="none", max_length=64)
    cache_tokens_left: Count = 0
    version: str = Field(default="", max_length=64)
    public_name: str = Field(default="", max_length=128)
    # Reachability (swarm.relays): the peer ids of the relays this peer is reachable through (empty: dialled
    # directly), and False when it found that nobody can dial it and it uses no relay (--relay never behind NAT).
    relays: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=list, max_length=MAX_RELAYS)
    reachable: bool = True

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if not known_dtype(value):
            raise ValueError(f"unknown dtype {value!r} (expected one of {', '.join(DTYPES)})")
        return value

    @field_validator("compression")
    @classmethod
    def _known_compression(cls, value: str) -> str:
        # a closed set (swarm.tags): every declared configuration has a calibrated tolerance, so it can be checked
        if not known_compression(value):
            raise ValueError(f"unknown compression tag {value!r} (see swarm.tags)")
        return value

    @model_validator(mode="after")
    def _span_not_empty(self) -> ServerInfo:
        check_span(self.start, self.end)
        return self

    @property
    def relayed(self) -> bool:
        return bool(self.relays)

    def to_record(self) -> dict:
        """The DHT value: a map of plain msgpack types (the state by name).

        The reachability fields are left out while they hold their defaults, so a directly reachable peer's
        record stays what nodes of earlier versions (which reject unknown fields) accept.
        """
        omitted = {name for name, default in _REACH_DEFAULTS.items() if getattr(self, name) == default}
        return self.model_dump(mode="json", exclude=omitted)

    @classmethod
    def from_record(cls, value: object) -> ServerInfo:
        """Parse a DHT value; raises pydantic.ValidationError for anything but a well-formed record."""
        return cls.model_validate(value)


@dataclass(frozen=True)
class PeerSpan:
    """One peer serving blocks [start, end), as read from the DHT."""

    peer_id: PeerID
    info: ServerInfo

    @property
    def start(self) -> int:
        return self.info.start

    @property
    def end(self) -> int:
        return self.info.end


def online_spans(spans: list[PeerSpan]) -> list[PeerSpan]:
    """The spans of peers announcing ONLINE (joining and leaving peers serve nobody)."""
    return [s for s in spans if s.info.state == ServerState.ONLINE]


def block_key(dht_prefix: str, block: int) -> str:
    return f"{dht_prefix}_block{block}"


class PeerIdOwnerValidator(RecordValidatorBase):
    """Rejects a subkey "{peer id}[owner:{key}]" whose peer id is not the one libp2p derives from that key.

    RSASignatureValidator proves the record was signed by the key in the subkey; this binds that key to
    the peer id, so nobody can announce (or announce OFFLINE) under another peer's id.
    """

    def validate(self, record: DHTRecord) -> bool:
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            return True
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:  # not ours to judge
            return True
        if not isinstance(subkey, bytes) or b"[owner:" not in subkey:
            return True
        claimed, _, rest = subkey.partition(b"[owner:")
        public_key = rest[: rest.rfind(b"]")]
        try:
            return peer_id_of_public_key(public_key) == PeerID.from_base58(claimed.decode())
        except Exception:  # unparsable id or key: the record is malformed
            return False

    @property
    def priority(self) -> int:
        return 5  # after the signature check (10), before schema validation (0)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, PeerIdOwnerValidator)


def peer_id_of_public_key(ssh_public_key: bytes) -> PeerID:
    """The libp2p peer id of an RSA key given in OpenSSH format (hivemind's owner marker)."""
    der = RSAPublicKey.from_bytes(ssh_public_key)._public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(b"\x12\x20" + hashlib.sha256(encoded).digest())  # multihash: sha2-256, 32 bytes


class ServerInfoValidator(RecordValidatorBase):
    """Records under this model's block keys must be {owner subkey: ServerInfo}; other keys are let through.

    The owner subkey ("...[owner:{key}]") is what makes RSASignatureValidator demand a signature, so a block
    record without one is rejected here. The value must validate as a `ServerInfo` and serialise back to
    itself (nothing converted). Block keys hold one record per peer, never a plain value.
    """

    _OWNER = re.compile(b".*" + RSASignatureValidator.PUBLIC_KEY_REGEX + b".*")

    def __init__(self, dht_prefix: str, num_blocks: int):
        self._keys = {DHTID.generate(source=block_key(dht_prefix, i)).to_bytes() for i in range(num_blocks)}

    def validate(self, record: DHTRecord) -> bool:
        if record.key not in self._keys:
            return True
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            logger.debug("Rejected a block record without a subkey")
            return False
        try:
            subkey = DHTProtocol.serializer.loads(record.subkey)
            value = DHTProtocol.serializer.loads(record.value)
        except Exception:  # msgpack raises several unrelated types on garbage
            logger.debug("Rejected a block record that is not msgpack")
            return False
        if not isinstance(subkey, bytes) or self._OWNER.match(subkey) is None:
            logger.debug(f"Rejected a block record under a subkey without an owner key: {subkey!r:.100}")
            return False
        try:
            info = ServerInfo.from_record(value)
        except ValidationError as e:
            logger.debug(f"Rejected a malformed block record: {first_error(e)}")
            return False
        return info.to_record() == value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, ServerInfoValidator):
            return False
        self._keys |= other._keys
        return True


def make_validators(dht_prefix: str, num_blocks: int, signer: RSASignatureValidator) -> list:
    """The record validators every node of this model's swarm installs."""
    return [ServerInfoValidator(dht_prefix, num_blocks), signer, PeerIdOwnerValidator()]


def owner_subkey(peer_id: PeerID, signer: RSASignatureValidator) -> bytes:
    return peer_id.to_base58().encode() + signer.local_public_key


def _peer_id_from_subkey(subkey: bytes | str) -> PeerID | None:
    raw = subkey if isinstance(subkey, bytes) else subkey.encode()
    base58_id = raw.split(b"[owner:", 1)[0]
    try:
        return PeerID.from_base58(base58_id.decode())
    except Exception:  # anything unparsable is somebody else's record: skip it
        return None


async def _store_spans(
    _dht: DHT, node: DHTNode, keys: list[str], subkey: bytes, record: dict, expiration_time: float
) -> bool:
    results = await node.store_many(
        keys, [record] * len(keys), expiration_time=expiration_time, subkeys=[subkey] * len(keys)
    )
    return all(results.values())


def announce(
    dht: DHT,
    dht_prefix: str,
    blocks: range,
    info: ServerInfo,
    subkey: bytes,
    ttl: float = RECORD_TTL,
    timeout: float = 30.0,
) -> bool:
    """Write `info` under every block key of `blocks`; False if not stored in `timeout` seconds."""
    keys = [block_key(dht_prefix, i) for i in blocks]
    store = partial(_store_spans, keys=keys, subkey=subkey, record=info.to_record(), expiration_time=get_dht_time() + ttl)
    try:
        return dht.run_coroutine(store, return_future=True).result(timeout=timeout)
    except Exception as e:  # a dead DHT process or a timeout: the caller logs and carries on
        logger.debug(f"Announcing failed: {e!r}")
        return False


READ_TIMEOUT = 30.0  # seconds a read of the announcements may take


async def _get_blocks(_dht: DHT, node: DHTNode, keys: list[str]) -> dict:
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))  # the latest values
    return {key: (entry.value if entry is not None else None) for key, entry in found.items()}


def read_spans(dht: DHT, dht_prefix: str, num_blocks: int, timeout: float = READ_TIMEOUT) -> list[PeerSpan]:
    """Every live peer's announcement for this model, one `PeerSpan` per peer, sorted by peer id. Raises
    `concurrent.futures.TimeoutError` after `timeout` seconds: a read still waiting when its DHT shuts down is never
    answered, and would otherwise hold its thread (and so the process's exit) forever."""
    keys = [block_key(dht_prefix, i) for i in range(num_blocks)]
    found = dht.run_coroutine(partial(_get_blocks, keys=keys), return_future=True).result(timeout=timeout)
    return spans_from_records(found.values())


def spans_from_records(values) -> list[PeerSpan]:
    """Parse per-block DHT values ({subkey: ValueWithExpiration}) into one span per peer.

    A peer that moved has records under its old and new blocks; its latest announcement wins.
    """
    latest: dict[PeerID, tuple[float, ServerInfo]] = {}
    for value in values:
        if not isinstance(value, dict):
            continue
        for subkey, entry in value.items():
            peer_id = _peer_id_from_subkey(subkey)
            if peer_id is None or (peer_id in latest and latest[peer_id][0] >= entry.expiration_time):
                continue
            try:
                latest[peer_id] = (entry.expiration_time, ServerInfo.from_record(entry.value))
            except ValidationError:
                logger.debug(f"Skipping a malformed record from {peer_id}")
    by_id = sorted(latest.items(), key=lambda item: item[0].to_base58())
    return [PeerSpan(peer_id, info) for peer_id, (_, info) in by_id]
