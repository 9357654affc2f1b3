"""A stock gRPC client in another language, calling the broker as an agency would.

No code generated from lienthong's .proto files: the message types come from
the broker's reflection service, as grpcurl or Postman build them. Only stock
packages (grpcio, grpcio-reflection, grpcio-health-checking, protobuf,
cryptography; pinned in requirements.txt beside this file).

Reads its settings as JSON on stdin (so no national ID is on a command line):
  target      "127.0.0.1:PORT" of the broker
  certs       directory with ca.pem and MEMBER.pem / MEMBER.key
  consumer    member with a grant of birth records for `purpose`
  limited     member whose grant allows one lookup a minute for `limited_purpose`
  auditor     member with the auditor role
  portal      member with the subject-portal role
  subject     a national ID the civil-status register holds
  purpose, limited_purpose

Checks the answers a user relies on (status codes, trailers, the record, the
receipt), then verifies the receipt as an auditor outside the broker would:
the tree head's Ed25519 signature, the RFC 9162 inclusion proof of the entry,
and an RFC 9162 consistency proof between two tree heads. Exits non-zero at
the first check that fails, naming it; prints a JSON summary on success.
"""

import hashlib
import json
import struct
import sys
import time

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

CFG = json.load(sys.stdin)
SUMMARY = {"checks": []}


def check(name, condition, detail=""):
    if not condition:
        sys.stderr.write(f"FAILED: {name}: {detail}\n")
        sys.exit(1)
    SUMMARY["checks"].append(name)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def channel(member=None):
    ca = read(f"{CFG['certs']}/ca.pem")
    if member is None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=read(f"{CFG['certs']}/{member}.key"),
            certificate_chain=read(f"{CFG['certs']}/{member}.pem"),
        )
    return grpc.secure_channel(CFG["target"], creds)


class Dynamic:
    """Unary and server-streaming calls with types from the broker's reflection."""

    def __init__(self, ch):
        self.ch = ch
        self.reflection = ProtoReflectionDescriptorDatabase(ch)
        self.pool = DescriptorPool(self.reflection)

    def method(self, service, name):
        desc = self.pool.FindServiceByName(service).methods_by_name[name]
        req = message_factory.GetMessageClass(desc.input_type)
        resp = message_factory.GetMessageClass(desc.output_type)
        path = f"/{service}/{name}"
        if desc.server_streaming:
            call = self.ch.unary_stream(path, request_serializer=req.SerializeToString,
                                        response_deserializer=resp.FromString)
        else:
            call = self.ch.unary_unary(path, request_serializer=req.SerializeToString,
                                       response_deserializer=resp.FromString)
        return req, call

    def call(self, service, name, **fields):
        req, call = self.method(service, name)
        return call.with_call(req(**fields), timeout=10)


def expect_error(name, code, fn, needle=None):
    try:
        fn()
    except grpc.RpcError as e:
        check(name, e.code() == code, f"got {e.code()}: {e.details()}")
        if needle is not None:
            check(f"{name}: message names {needle}", needle in (e.details() or ""), e.details())
        check(f"{name}: no national id in the message", CFG["subject"] not in (e.details() or ""), e.details())
        return e
    check(name, False, "the call succeeded")


# -- Health and reflection, as a load balancer and grpcurl use them ---------------

consumer_ch = channel(CFG["consumer"])
health = health_pb2_grpc.HealthStub(consumer_ch)
for service in ["", "lienthong.v1.Exchange", "lienthong.v1.Audit"]:
    status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
    check(f"health {service or '(server)'} serving", status == health_pb2.HealthCheckResponse.SERVING, status)
expect_error("health of an unknown service is NOT_FOUND", grpc.StatusCode.NOT_FOUND,
             lambda: health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10))
# A watch of a service the server does not know answers SERVICE_UNKNOWN and
# stays open (the standard), rather than failing.
watch = health.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
first = next(watch)
check("a watch of an unknown service is SERVICE_UNKNOWN",
      first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN, first.status)
check("the watch stays open", watch.is_active(), "the server ended it")
watch.cancel()

consumer = Dynamic(consumer_ch)
services = set(consumer.reflection.get_services())
for s in ["lienthong.v1.Exchange", "lienthong.v1.Audit", "lienthong.v1.Admin",
          "lienthong.v1.SchemaRegistry", "grpc.health.v1.Health"]:
    check(f"reflection lists {s}", s in services, sorted(services))

# -- Lookups ---------------------------------------------------------------------

query = json.dumps({"national_id": CFG["subject"]})
answer, call = consumer.call("lienthong.v1.Exchange", "Lookup", record_type="civil_status.birth_record",
                             query_json=query, purpose=CFG["purpose"], request_id="stock-client-1")
record = json.loads(answer.record_json)
check("lookup answers the record", record.get("full_name"), "no full_name")
check("only granted fields are released", "national_id" not in record and set(answer.fields_released) and
      all(f.startswith("/") for f in answer.fields_released), list(record))
check("the request id comes back", answer.request_id == "stock-client-1", answer.request_id)
receipt = answer.receipt
check("the receipt names a 32-byte leaf hash", len(receipt.leaf_hash) == 32, receipt)

# A stub set to compress its requests, as grpc-java's withCompression("gzip").
lookup_request, lookup = consumer.method("lienthong.v1.Exchange", "Lookup")
gzipped, _ = lookup.with_call(lookup_request(record_type="civil_status.birth_record", query_json=query,
                                             purpose=CFG["purpose"], request_id="gzip-client-1"),
                              timeout=10, compression=grpc.Compression.Gzip)
check("a gzip-compressed lookup is served", json.loads(gzipped.record_json) == record, gzipped.record_json)

expect_error("a purpose not granted is PERMISSION_DENIED", grpc.StatusCode.PERMISSION_DENIED,
             lambda: consumer.call("lienthong.v1.Exchange", "Lookup", record_type="civil_status.birth_record",
                                   query_json=query, purpose="no-such-law/art-1", request_id="stock-client-2"),
             needle="purpose")
expect_error("a query against its schema is INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT,
             lambda: consumer.call("lienthong.v1.Exchange", "Lookup", record_type="civil_status.birth_record",
                                   query_json='{"national_id": 12}', purpose=CFG["purpose"],
                                   request_id="stock-client-3"),
             needle="/national_id")
expect_error("an unknown method is UNIMPLEMENTED", grpc.StatusCode.UNIMPLEMENTED,
             lambda: consumer_ch.unary_unary("/lienthong.v1.Exchange/NoSuchMethod")(b"", timeout=10))

limited = Dynamic(channel(CFG["limited"]))
limited.call("lienthong.v1.Exchange", "Lookup", record_type="civil_status.birth_record", query_json=query,
             purpose=CFG["limited_purpose"], request_id="stock-client-4")
error = expect_error("past the grant's rate RESOURCE_EXHAUSTED", grpc.StatusCode.RESOURCE_EXHAUSTED,
                     lambda: limited.call("lienthong.v1.Exchange", "Lookup", record_type="civil_status.birth_record",
                                          query_json=query, purpose=CFG["limited_purpose"],
                                          request_id="stock-client-5"))
trailers = dict(error.trailing_metadata() or ())
check("retry-after trailer in whole seconds", trailers.get("retry-after", "").isdigit()
      and 0 < int(trailers["retry-after"]) <= 60, trailers)

# Health answers without a client certificate (for load balancers' probes);
# nothing else does.
anonymous = channel(None)
status = health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest(), timeout=10).status
check("health answers a probe without a certificate", status == health_pb2.HealthCheckResponse.SERVING, status)
lookup_request, anonymous_lookup = consumer.method("lienthong.v1.Exchange", "Lookup")
anonymous_lookup = anonymous.unary_unary("/lienthong.v1.Exchange/Lookup",
                                         request_serializer=lookup_request.SerializeToString)
expect_error("a lookup without a client certificate is UNAUTHENTICATED", grpc.StatusCode.UNAUTHENTICATED,
             lambda: anonymous_lookup(lookup_request(record_type="civil_status.birth_record", query_json=query,
                                                     purpose=CFG["purpose"], request_id="stock-client-0"),
                                      timeout=10),
             needle="certificate")

# -- The receipt, verified as an auditor outside the broker would ----------------


def leaf_hash(leaf):
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_inclusion(index, size, leaf, path):
    """RFC 9162 section 2.1.3.2."""
    if index >= size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def consistent(first, second, first_root, second_root, path):
    """RFC 9162 section 2.1.4.2."""
    if first == second:
        return not path and first_root == second_root
    if first == 0 or first > second or not path:
        return False
    if first & (first - 1) == 0:  # a power of two: the old root starts the path
        path = [first_root] + list(path)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root


auditor = Dynamic(channel(CFG["auditor"]))
key, _ = auditor.call("lienthong.v1.Audit", "GetPublicKey", log_id=receipt.log_id)
check("the log id is the SHA-256 of its key", hashlib.sha256(key.public_key).hexdigest() == receipt.log_id,
      key.log_id)
public_key = Ed25519PublicKey.from_public_bytes(key.public_key)


def verified_head(sth):
    signed = (b"lienthong-sth-v1" + sth.log_id.encode() + struct.pack(">QQ", sth.tree_size, sth.timestamp_ms)
              + sth.root_hash)
    try:
        public_key.verify(sth.signature, signed)
    except Exception as e:  # cryptography raises InvalidSignature
        check("the tree head's signature verifies", False, repr(e))
    check("the tree head's signature verifies", True)
    return sth


def head_covering(size):
    deadline = time.monotonic() + 20
    while True:
        sth, _ = auditor.call("lienthong.v1.Audit", "GetSignedTreeHead", log_id=receipt.log_id)
        if sth.tree_size >= size:
            return verified_head(sth)
        check("a tree head covers the entry within 20 s", time.monotonic() < deadline, sth.tree_size)
        time.sleep(0.2)


head = head_covering(receipt.sequence + 1)
proof, _ = auditor.call("lienthong.v1.Audit", "GetInclusionProof", log_id=receipt.log_id,
                        sequence=receipt.sequence, tree_size=head.tree_size)
check("the proof is of the receipt's leaf", proof.leaf_hash == receipt.leaf_hash, proof)
check("the inclusion proof leads to the signed root",
      root_from_inclusion(receipt.sequence, head.tree_size, receipt.leaf_hash, list(proof.path)) == head.root_hash)
check("a proof with a byte changed does not", not proof.path or root_from_inclusion(
    receipt.sequence, head.tree_size, receipt.leaf_hash,
    [bytes([proof.path[0][0] ^ 1]) + proof.path[0][1:]] + list(proof.path[1:])) != head.root_hash)

export_request, export = auditor.method("lienthong.v1.Audit", "ExportEntries")
entries = list(export(export_request(filter={"log_id": receipt.log_id}, from_sequence=receipt.sequence), timeout=10))
entry = entries[0]
check("the export starts at the entry", entry.sequence == receipt.sequence, entry.sequence)
check("the leaf hash is SHA-256(0x00 || leaf_json)", leaf_hash(entry.leaf_json.encode()) == receipt.leaf_hash)
check("the leaf keeps no national id in clear", CFG["subject"] not in entry.leaf_json)
check("the entry records the consumer and purpose",
      entry.actor == CFG["consumer"] and entry.purpose == CFG["purpose"], entry)
outcomes = {e.request_id: e.outcome for e in entries if e.request_id.startswith("stock-client-")}
SUMMARY["outcomes"] = {k: int(v) for k, v in sorted(outcomes.items())}

# A later tree extends this one.
consumer.call("lienthong.v1.Exchange", "Lookup", record_type="civil_status.birth_record", query_json=query,
              purpose=CFG["purpose"], request_id="stock-client-6")
later = head_covering(head.tree_size + 1)
consistency, _ = auditor.call("lienthong.v1.Audit", "GetConsistencyProof", log_id=receipt.log_id,
                              first=head.tree_size, second=later.tree_size)
check("the consistency proof links the two signed roots",
      consistent(head.tree_size, later.tree_size, head.root_hash, later.root_hash, list(consistency.path)))
check("a forged old root is not consistent",
      not consistent(head.tree_size, later.tree_size, hashlib.sha256(b"forged").digest(), later.root_hash,
                     list(consistency.path)))

# The citizen's own history, through the subject portal.
portal = Dynamic(channel(CFG["portal"]))
history, _ = portal.call("lienthong.v1.Audit", "SubjectHistory", subject_key=CFG["subject"], limit=100)
check("the citizen's history holds the lookup's receipt",
      any(a.receipt.sequence == receipt.sequence and a.receipt.log_id == receipt.log_id for a in history.accesses),
      len(history.accesses))

SUMMARY["sequence"] = receipt.sequence
SUMMARY["tree_sizes"] = [head.tree_size, later.tree_size]
print(json.dumps(SUMMARY))
