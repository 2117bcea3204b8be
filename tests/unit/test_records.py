"""Tests of swarm.records: the DHT value schema, hivemind's validators on it, and reading spans back.

Records are built exactly as a DHT node stores them (key id, msgpack subkey, msgpack value) and checked
with the validators directly, so no DHT is started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer, ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from pydantic import ValidationError

from swarm.records import (
    PeerSpan,
    ServerInfo,
    ServerInfoValidator,
    ServerState,
    block_key,
    make_validators,
    owner_subkey,
    spans_from_records,
)

PREFIX = "tiny-llama@0123abcd"
NUM_BLOCKS = 4
INFO = ServerInfo(
    state=ServerState.ONLINE, start=1, end=3, throughput=12.5, dtype="float32", compression="none",
    cache_tokens_left=8192, version="0.1.0", public_name="alice",
)


def peer(name: str) -> PeerID:
    return PeerID(b"\x12\x20" + hashlib.sha256(name.encode()).digest())


@pytest.fixture(scope="module")
def signer() -> RSASignatureValidator:
    return RSASignatureValidator(RSAPrivateKey())


@pytest.fixture(scope="module")
def other_signer() -> RSASignatureValidator:
    return RSASignatureValidator(RSAPrivateKey())


@pytest.fixture(scope="module")
def validator(signer) -> CompositeValidator:
    """What a DHT node does with `record_validators=make_validators(...)`."""
    return CompositeValidator(make_validators(PREFIX, NUM_BLOCKS, signer))


def record(value: object, subkey: bytes, block: int = 1, key: str | None = None) -> DHTRecord:
    return DHTRecord(
        key=DHTID.generate(source=key if key is not None else block_key(PREFIX, block)).to_bytes(),
        subkey=MSGPackSerializer.dumps(subkey),
        value=MSGPackSerializer.dumps(value),
        expiration_time=get_dht_time() + 60,
    )


def signed(validator: CompositeValidator, unsigned: DHTRecord) -> DHTRecord:
    return dataclasses.replace(unsigned, value=validator.sign_value(unsigned))


# --- ServerInfo <-> record ---


def test_server_info_round_trip():
    value = INFO.to_record()
    assert value["state"] == "online" and isinstance(value["state"], str)
    assert value == {
        "state": "online", "start": 1, "end": 3, "throughput": 12.5, "dtype": "float32", "compression": "none",
        "cache_tokens_left": 8192, "version": "0.1.0", "public_name": "alice",
    }
    assert ServerInfo.from_record(value) == INFO
    assert ServerInfo.from_record(MSGPackSerializer.loads(MSGPackSerializer.dumps(value))) == INFO


@pytest.mark.parametrize(
    "change",
    [
        {"start": 1.0},
        {"throughput": 12},  # strict float: an int is a different type
        {"state": "sleeping"},
        {"state": 2},
        {"dtype": None},
        {"start": "1"},
        {"start": True},
        {"cache_tokens_left": -1},
        {"throughput": float("nan")},
        {"throughput": -1.0},
        {"start": 3},  # start == end: an empty span
        {"end": 2**20},
        {"public_name": "x" * 129},
        {"surprise": 1},
    ],
    ids=str,
)
def test_from_record_rejects_wrong_types(change):
    with pytest.raises(ValidationError):
        ServerInfo.from_record({**INFO.to_record(), **change})


def test_from_record_rejects_missing_fields():
    value = INFO.to_record()
    del value["end"]
    with pytest.raises(ValidationError):
        ServerInfo.from_record(value)


def test_server_info_is_frozen_and_takes_only_exact_types_in_code_too():
    with pytest.raises(ValidationError):
        INFO.start = 2
    assert ServerInfo(state="online", start=0, end=1, throughput=1.0, dtype="float32").state is ServerState.ONLINE
    with pytest.raises(ValidationError):
        ServerInfo(state=ServerState.ONLINE, start=0, end=1, throughput=1, dtype="float32")


def test_block_key():
    assert block_key(PREFIX, 7) == f"{PREFIX}_block7"


def test_peer_span_bounds():
    span = PeerSpan(peer("a"), INFO)
    assert (span.start, span.end) == (1, 3)


# --- validators ---


def test_validators_accept_a_signed_well_formed_record(validator, signer):
    subkey = owner_subkey(peer_id_of(signer._private_key), signer)
    for block in range(NUM_BLOCKS):
        assert validator.validate(signed(validator, record(INFO.to_record(), subkey, block)))


def test_owner_subkey_holds_the_peer_id_and_public_key(signer):
    subkey = owner_subkey(peer("a"), signer)
    assert subkey.startswith(peer("a").to_base58().encode())
    assert subkey.endswith(signer.local_public_key)
    assert b"[owner:" in subkey


def test_signing_strips_back_to_the_value(validator, signer):
    unsigned = record(INFO.to_record(), owner_subkey(peer_id_of(signer._private_key), signer))
    stored = signed(validator, unsigned)
    assert stored.value != unsigned.value
    assert MSGPackSerializer.loads(validator.strip_value(stored)) == INFO.to_record()


@pytest.mark.parametrize(
    "change",
    [
        {"start": 1.0},
        {"throughput": 12},
        {"cache_tokens_left": "8192"},
        {"state": "sleeping"},
        {"public_name": None},
        {"surprise": 1},  # an extra field
    ],
    ids=str,
)
def test_validators_reject_wrong_types_and_extra_fields(validator, signer, change):
    value = {**INFO.to_record(), **change}
    assert not validator.validate(signed(validator, record(value, owner_subkey(peer_id_of(signer._private_key), signer))))


def test_validators_reject_a_missing_field(validator, signer):
    value = INFO.to_record()
    del value["dtype"]
    assert not validator.validate(signed(validator, record(value, owner_subkey(peer_id_of(signer._private_key), signer))))


@pytest.mark.parametrize("value", [[1, 2], "online", 5, None])
def test_validators_reject_values_that_are_not_records(validator, signer, value):
    assert not validator.validate(signed(validator, record(value, owner_subkey(peer_id_of(signer._private_key), signer))))


def test_validators_reject_an_unsigned_record(validator, signer):
    assert not validator.validate(record(INFO.to_record(), owner_subkey(peer_id_of(signer._private_key), signer)))


def test_validators_reject_a_tampered_record(validator, signer):
    genuine = signed(validator, record(INFO.to_record(), owner_subkey(peer_id_of(signer._private_key), signer)))
    forged_value = {**INFO.to_record(), "throughput": 1e6}
    signature = genuine.value[len(MSGPackSerializer.dumps(INFO.to_record())) :]
    forged = dataclasses.replace(genuine, value=MSGPackSerializer.dumps(forged_value) + signature)
    assert not validator.validate(forged)


def test_validators_reject_a_record_signed_by_someone_else(signer, other_signer):
    """Mallory cannot write under Alice's subkey: her signature does not match Alice's public key."""
    mallory = CompositeValidator(make_validators(PREFIX, NUM_BLOCKS, other_signer))
    alice = CompositeValidator(make_validators(PREFIX, NUM_BLOCKS, signer))
    unsigned = record(INFO.to_record(), owner_subkey(peer_id_of(signer._private_key), signer))
    assert mallory.sign_value(unsigned) == unsigned.value  # not her key: she cannot sign it
    mallory_signature = RSASignatureValidator.SIGNATURE_FORMAT.replace(
        b"_value_", other_signer._private_key.sign(MSGPackSerializer.dumps(dataclasses.astuple(unsigned)))
    )
    forged = dataclasses.replace(unsigned, value=unsigned.value + mallory_signature)
    assert not alice.validate(forged)
    assert not mallory.validate(forged)


def peer_id_of(key: RSAPrivateKey) -> PeerID:
    """The libp2p peer id that p2pd derives from this identity key."""
    return PeerID.from_identity(crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes()).SerializeToString())


def test_a_peer_can_announce_under_its_own_peer_id(signer, validator):
    own = owner_subkey(peer_id_of(signer._private_key), signer)
    assert validator.validate(signed(validator, record(INFO.to_record(), own)))


def test_validators_reject_a_record_under_someone_elses_peer_id(signer, other_signer):
    alice_id = peer_id_of(signer._private_key)
    mallory = CompositeValidator(make_validators(PREFIX, NUM_BLOCKS, other_signer))
    impersonation = signed(mallory, record(INFO.to_record(), owner_subkey(alice_id, other_signer)))
    assert not CompositeValidator(make_validators(PREFIX, NUM_BLOCKS, signer)).validate(impersonation)


def test_validators_reject_a_subkey_without_an_owner_key(validator):
    assert not validator.validate(record(INFO.to_record(), peer("a").to_base58().encode()))


def test_keys_of_other_applications_are_left_alone(validator):
    assert validator.validate(record({"anything": 1}, b"subkey", key="some_other_key"))


# --- the schema validator on its own (records as they reach it, signature already stripped) ---


@pytest.fixture(scope="module")
def schema() -> ServerInfoValidator:
    return ServerInfoValidator(PREFIX, NUM_BLOCKS)


def test_schema_validator_accepts_a_well_formed_record_on_every_block(schema, signer):
    for block in range(NUM_BLOCKS):
        assert schema.validate(record(INFO.to_record(), owner_subkey(peer("a"), signer), block))


def test_schema_validator_rejects_a_string_where_an_int_belongs(schema, signer):
    assert not schema.validate(record({**INFO.to_record(), "start": "1"}, owner_subkey(peer("a"), signer)))
    assert not schema.validate(record({**INFO.to_record(), "cache_tokens_left": "8192"}, owner_subkey(peer("a"), signer)))


@pytest.mark.parametrize(
    "change",
    [{"end": 1.5}, {"cache_tokens_left": -5}, {"dtype": "f" * 33}, {"state": b"online"}, {"start": 5, "end": 2}],
    ids=str,
)
def test_schema_validator_rejects_out_of_range_and_oversized_fields(schema, signer, change):
    assert not schema.validate(record({**INFO.to_record(), **change}, owner_subkey(peer("a"), signer)))


@pytest.mark.parametrize("change", [{"compression": "int4"}, {"compression": "svd-rank0-plain"},
                                    {"compression": "none+nf4"}, {"dtype": "float64"}], ids=str)
def test_schema_validator_refuses_a_configuration_outside_the_closed_set(schema, signer, change):
    # a peer declaring a configuration nobody can check is refused when it announces
    assert not schema.validate(record({**INFO.to_record(), **change}, owner_subkey(peer("a"), signer)))
    with pytest.raises(ValidationError):
        ServerInfo.from_record({**INFO.to_record(), **change})


def test_schema_validator_requires_an_owner_subkey_and_a_record_per_peer(schema, signer):
    good = INFO.to_record()
    assert not schema.validate(record(good, b"no owner here"))
    assert not schema.validate(record(good, owner_subkey(peer("a"), signer).decode()))  # a str subkey
    regular = DHTRecord(
        key=DHTID.generate(source=block_key(PREFIX, 0)).to_bytes(), subkey=DHTProtocol.IS_REGULAR_VALUE,
        value=MSGPackSerializer.dumps(good), expiration_time=get_dht_time() + 60,
    )
    assert not schema.validate(regular)
    garbage = dataclasses.replace(record(good, owner_subkey(peer("a"), signer)), value=b"\xc1")
    assert not schema.validate(garbage)


def test_schema_validator_checks_only_this_models_block_keys(schema, signer):
    subkey = owner_subkey(peer("a"), signer)
    assert schema.validate(record("anything", subkey, key=block_key(PREFIX, NUM_BLOCKS)))  # past the last block
    assert schema.validate(record("anything", subkey, key=block_key("other-model@0000", 0)))


def test_schema_validators_merge_and_survive_pickling(signer):
    """The DHT runs in a process of its own: validators travel there pickled."""
    merged = CompositeValidator([ServerInfoValidator(PREFIX, 1), ServerInfoValidator("other@00", 1)])
    [schema] = pickle.loads(pickle.dumps(merged))._validators
    bad = {**INFO.to_record(), "start": "1"}
    assert not schema.validate(record(bad, owner_subkey(peer("a"), signer), 0))
    assert not schema.validate(record(bad, owner_subkey(peer("a"), signer), key=block_key("other@00", 0)))


# --- reading spans back ---


def entry(value: object) -> ValueWithExpiration:
    return ValueWithExpiration(value, get_dht_time() + 60)


def test_spans_from_records_merges_a_peer_announced_on_several_blocks(signer, other_signer):
    alice, bob = owner_subkey(peer("alice"), signer), owner_subkey(peer("bob"), other_signer)
    bob_info = INFO.model_copy(update={"start": 2, "end": 4, "public_name": "bob"})
    values = [
        None,  # block 0: nobody
        {alice: entry(INFO.to_record())},
        {alice: entry(INFO.to_record()), bob: entry(bob_info.to_record())},
        {bob: entry(bob_info.to_record())},
    ]
    spans = spans_from_records(values)
    assert sorted(spans, key=lambda s: s.peer_id.to_base58()) == spans  # sorted by peer id
    assert {s.peer_id: s.info for s in spans} == {peer("alice"): INFO, peer("bob"): bob_info}


def test_spans_from_records_skips_malformed_entries(signer):
    good = owner_subkey(peer("good"), signer)
    values = [
        {
            owner_subkey(peer("bad-type"), signer): entry({**INFO.to_record(), "start": "1"}),
            owner_subkey(peer("bad-state"), signer): entry({**INFO.to_record(), "state": "sleeping"}),
            owner_subkey(peer("missing"), signer): entry({"state": "online"}),
            owner_subkey(peer("not-a-dict"), signer): entry([1, 2, 3]),
            b"not base58 !!![owner:x]": entry(INFO.to_record()),
            good: entry(INFO.to_record()),
        },
        "not a dict of subkeys",
        42,
    ]
    spans = spans_from_records(values)
    assert [(s.peer_id, s.info) for s in spans] == [(peer("good"), INFO)]


def test_spans_from_records_accepts_str_subkeys(signer):
    subkey = owner_subkey(peer("a"), signer).decode()
    assert [s.peer_id for s in spans_from_records([{subkey: entry(INFO.to_record())}])] == [peer("a")]


def test_a_malformed_first_record_does_not_hide_a_later_good_one(signer):
    subkey = owner_subkey(peer("a"), signer)
    values = [{subkey: entry({**INFO.to_record(), "end": None})}, {subkey: entry(INFO.to_record())}]
    assert [s.info for s in spans_from_records(values)] == [INFO]


def test_spans_from_records_of_nothing():
    assert spans_from_records([]) == []
    assert spans_from_records([None, None]) == []


def test_a_moved_peer_is_shown_by_its_latest_announcement(signer):
    subkey = owner_subkey(peer("mover"), signer)
    old = ServerInfo(state=ServerState.OFFLINE, start=0, end=10, throughput=5.0, dtype="float32")
    new = ServerInfo(state=ServerState.ONLINE, start=10, end=20, throughput=5.0, dtype="float32")
    values = [
        {subkey: ValueWithExpiration(old.to_record(), get_dht_time() + 50)},  # block 0, announced earlier
        {subkey: ValueWithExpiration(new.to_record(), get_dht_time() + 60)},  # block 10, announced later
    ]
    for ordering in (values, values[::-1]):
        [span] = spans_from_records(ordering)
        assert (span.start, span.end, span.info.state) == (10, 20, ServerState.ONLINE)


# --- reachability fields ---


def test_a_direct_peers_record_leaves_the_reachability_fields_out_as_earlier_versions_wrote_it():
    assert "relays" not in INFO.to_record() and "reachable" not in INFO.to_record()
    assert not INFO.relayed and INFO.reachable


def test_a_relayed_and_an_unreachable_peers_records_round_trip_and_validate(schema, signer):
    relayed = INFO.model_copy(update={"relays": ["QmRelayOne", "QmRelayTwo"]})
    hidden = INFO.model_copy(update={"reachable": False})
    for info in (relayed, hidden):
        assert ServerInfo.from_record(info.to_record()) == info
        assert schema.validate(record(info.to_record(), owner_subkey(peer("a"), signer)))
    assert relayed.relayed and relayed.to_record()["relays"] == ["QmRelayOne", "QmRelayTwo"]
    assert hidden.to_record()["reachable"] is False


@pytest.mark.parametrize("change", [{"relays": []}, {"reachable": True}, {"relays": ["Qm"] * 5},
                                    {"relays": "QmRelayOne"}, {"reachable": 0}], ids=str)
def test_schema_validator_rejects_non_canonical_or_oversized_reachability(schema, signer, change):
    assert not schema.validate(record({**INFO.to_record(), **change}, owner_subkey(peer("a"), signer)))
