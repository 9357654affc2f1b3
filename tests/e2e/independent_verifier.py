"""An independent verifier of lienthong's access log, written from README.md
("Verifying the log without lienthong") and the .proto files alone, never
from the Rust code: what an auditor in another language would write.

No code generated from the .proto files (message types come from the
broker's reflection service); only stock packages (grpcio,
grpcio-reflection, protobuf, cryptography; see requirements.txt).

Reads its settings as JSON on stdin (no national ID on a command line):
  target      "127.0.0.1:PORT" of the broker
  certs       directory with ca.pem and MEMBER.pem / MEMBER.key
  consumer    member with a grant of `record_type` for `purpose`
  auditor     member with the auditor role
  subject     a national ID the register holds
  record_type, purpose
  export, sth, key   files written by `audit export`, `audit sth --json` and
                     `audit key --json` (the head fetched before the export)

Checks, online: the log id is the hash of the key; a tree head's signature;
a lookup's receipt by its inclusion proof against a signed head; a
consistency proof between two signed heads; every inclusion and consistency
proof of the log up to the newest head against roots it computes itself.
Offline: the export against the head, and that an export with one leaf
altered (its leaf hash recomputed), or a head with its size changed, fails.
Exits non-zero at the first check that fails, naming it; prints a JSON
summary on success.
"""

import hashlib
import json
import struct
import sys
import time

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SUMMARY = {"checks": []}


class Failed(Exception):
    pass


def check(name, condition, detail=""):
    if not condition:
        raise Failed(f"{name}: {detail}")
    SUMMARY["checks"].append(name)


# RFC 9162 hashing ---------------------------------------------------------------------


def sha256(data):
    return hashlib.sha256(data).digest()


def leaf_hash(leaf):
    return sha256(b"\x00" + leaf)


def node_hash(left, right):
    return sha256(b"\x01" + left + right)


def merkle_root(leaves):
    """RFC 9162 2.1.1, over leaf hashes."""
    if not leaves:
        return sha256(b"")
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


def root_from_inclusion(index, size, leaf, path):
    """RFC 9162 2.1.3.2; None when the path does not fit the tree."""
    if index >= size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def consistent(first, second, first_root, second_root, path):
    """RFC 9162 2.1.4.2."""
    if first > second:
        return False
    if first == second:
        return not path and first_root == second_root
    if first == 0:
        return not path
    if first & (first - 1) == 0:
        path = [first_root] + list(path)
    if not path:
        return False
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
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root


# Keys and signed tree heads -----------------------------------------------------------


def public_key(raw, log_id):
    check("the log id is the hex SHA-256 of the raw public key", hashlib.sha256(raw).hexdigest() == log_id,
          f"{hashlib.sha256(raw).hexdigest()} != {log_id}")
    return Ed25519PublicKey.from_public_bytes(raw)


def signed_bytes(log_id, tree_size, timestamp_ms, root):
    """README: "lienthong-sth-v1" || log_id (64 ASCII hex) || u64be(size) || u64be(ms) || root."""
    out = b"lienthong-sth-v1" + log_id.encode("ascii") + struct.pack(">QQ", tree_size, timestamp_ms) + root
    assert len(out) == 128
    return out


def signature_valid(key, log_id, tree_size, timestamp_ms, root, signature):
    try:
        key.verify(signature, signed_bytes(log_id, tree_size, timestamp_ms, root))
        return True
    except InvalidSignature:
        return False


def check_head(name, key, head):
    check(f"{name}: signature", signature_valid(key, head.log_id, head.tree_size, head.timestamp_ms,
                                                bytes(head.root_hash), bytes(head.signature)),
          f"size {head.tree_size}")
    check(f"{name}: signed in the last hour (timestamp in ms)",
          abs(head.timestamp_ms - time.time() * 1000) < 3_600_000, str(head.timestamp_ms))


# gRPC through reflection --------------------------------------------------------------


class Client:
    def __init__(self, cfg, member):
        def read(path):
            with open(path, "rb") as f:
                return f.read()

        creds = grpc.ssl_channel_credentials(
            root_certificates=read(f"{cfg['certs']}/ca.pem"),
            private_key=read(f"{cfg['certs']}/{member}.key"),
            certificate_chain=read(f"{cfg['certs']}/{member}.pem"),
        )
        self.channel = grpc.secure_channel(cfg["target"], creds)
        self.pool = DescriptorPool(ProtoReflectionDescriptorDatabase(self.channel))

    def call(self, service, method, **fields):
        md = self.pool.FindServiceByName(f"lienthong.v1.{service}").methods_by_name[method]
        request = message_factory.GetMessageClass(md.input_type)(**fields)
        response = message_factory.GetMessageClass(md.output_type)
        stub = self.channel.unary_unary(f"/lienthong.v1.{service}/{method}",
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=response.FromString)
        return stub(request, timeout=30)


def online(cfg):
    auditor = Client(cfg, cfg["auditor"])
    consumer = Client(cfg, cfg["consumer"])
    k = consumer.call("Audit", "GetPublicKey")
    key = public_key(bytes(k.public_key), k.log_id)

    first = consumer.call("Audit", "GetSignedTreeHead")
    check("the head is the key's log's", first.log_id == k.log_id)
    check_head("first head", key, first)

    answer = consumer.call("Exchange", "Lookup", record_type=cfg["record_type"],
                           query_json=json.dumps({"national_id": cfg["subject"]}),
                           purpose=cfg["purpose"], request_id="independent-verifier")
    receipt = answer.receipt
    check("the receipt names the log", receipt.log_id == k.log_id)
    check("the receipt's entry is past the first head", receipt.sequence >= first.tree_size)
    # The entry is provable once a head covers it (audit.sign_interval_ms).
    for _ in range(300):
        try:
            proof = consumer.call("Audit", "GetInclusionProof", sequence=receipt.sequence)
            break
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.OUT_OF_RANGE:
                raise
            time.sleep(0.1)
    else:
        raise Failed("no signed head covered the receipt")
    head = proof.tree_head
    check("the inclusion proof carries its signed head", proof.HasField("tree_head"))
    check_head("inclusion proof's head", key, head)
    check("the proof is of the receipt's leaf", bytes(proof.leaf_hash) == bytes(receipt.leaf_hash))
    root = root_from_inclusion(receipt.sequence, head.tree_size, bytes(receipt.leaf_hash),
                               [bytes(p) for p in proof.path])
    check("the receipt is in the signed tree", root == bytes(head.root_hash))
    proof = consumer.call("Audit", "GetConsistencyProof", first=first.tree_size, second=head.tree_size)
    check("the newer head extends the first",
          consistent(first.tree_size, head.tree_size, bytes(first.root_hash), bytes(head.root_hash),
                     [bytes(p) for p in proof.path]), f"{first.tree_size} -> {head.tree_size}")
    SUMMARY["sequence"] = receipt.sequence
    # Against the newest head (second = 0), the proof carries that head.
    proof = consumer.call("Audit", "GetConsistencyProof", first=first.tree_size)
    check("a proof against the newest head carries it",
          proof.HasField("tree_head") and proof.tree_head.tree_size == proof.second, str(proof.second))
    check_head("consistency proof's head", key, proof.tree_head)
    check("the newest head extends the first",
          consistent(first.tree_size, proof.second, bytes(first.root_hash), bytes(proof.tree_head.root_hash),
                     [bytes(p) for p in proof.path]), f"{first.tree_size} -> {proof.second}")

    # Every proof of the log up to the newest head, against roots computed
    # here from the leaves: the proof layouts, not one lucky case.
    head = auditor.call("Audit", "GetSignedTreeHead")
    check_head("newest head", key, head)
    leaves, token = [], ""
    while True:
        page = auditor.call("Audit", "QueryEntries", page_size=1000, page_token=token)
        for e in page.entries:
            if leaf_hash(e.leaf_json.encode("utf-8")) != bytes(e.leaf_hash):
                raise Failed(f"entry {e.sequence}'s leaf does not hash to its leaf hash")
            leaves.append(bytes(e.leaf_hash))
        token = page.next_page_token
        if not token:
            break
    check("every queried leaf hashes to its leaf hash", len(leaves) >= head.tree_size)
    n = head.tree_size
    roots = [merkle_root(leaves[:i]) for i in range(n + 1)]
    check("the leaves rebuild the newest signed root", roots[n] == bytes(head.root_hash))
    for size in range(1, n + 1):
        for index in range(size):
            p = consumer.call("Audit", "GetInclusionProof", sequence=index, tree_size=size)
            got = root_from_inclusion(index, size, bytes(p.leaf_hash), [bytes(h) for h in p.path])
            if got != roots[size] or bytes(p.leaf_hash) != leaves[index]:
                raise Failed(f"inclusion proof of entry {index} in the tree of size {size}")
    for a in range(n + 1):
        for b in range(a, n + 1):
            p = consumer.call("Audit", "GetConsistencyProof", first=a, second=b)
            if not consistent(a, b, roots[a], roots[b], [bytes(h) for h in p.path]):
                raise Failed(f"consistency proof from size {a} to size {b}")
    check("every inclusion and consistency proof up to the newest head", True)
    SUMMARY["proved_up_to"] = n


# Offline: an export against a head --------------------------------------------------


def verify_export(lines, head, key):
    log_id = head["log_id"]
    if not signature_valid(key, log_id, head["tree_size"], head["timestamp_ms"],
                           bytes.fromhex(head["root_hash"]), bytes.fromhex(head["signature"])):
        raise Failed("the head's signature does not verify")
    leaves = []
    for n, line in enumerate(lines, 1):
        e = json.loads(line)
        if e["log_id"] != log_id:
            raise Failed(f"line {n} belongs to log {e['log_id']}")
        if e["sequence"] != len(leaves):
            raise Failed(f"line {n} holds sequence {e['sequence']}, expected {len(leaves)}")
        h = leaf_hash(e["leaf"].encode("utf-8"))
        if h.hex() != e["leaf_hash"]:
            raise Failed(f"line {n}: the leaf does not hash to its leaf_hash")
        leaves.append(h)
    if len(leaves) < head["tree_size"]:
        raise Failed(f"the export holds {len(leaves)} entries, the head signs {head['tree_size']}")
    if merkle_root(leaves[: head["tree_size"]]).hex() != head["root_hash"]:
        raise Failed("the export does not rebuild the signed root")
    return len(leaves)


def offline(cfg):
    with open(cfg["key"]) as f:
        k = json.load(f)
    key = public_key(bytes.fromhex(k["public_key_hex"]), k["log_id"])
    with open(cfg["sth"]) as f:
        head = json.load(f)
    check("the exported head is the key's log's", head["log_id"] == k["log_id"])
    with open(cfg["export"], "rb") as f:
        lines = f.read().decode("utf-8").splitlines()
    SUMMARY["exported"] = verify_export(lines, head, key)
    check("the export verifies against the head", True)

    # The checks must be able to fail: a leaf altered with its leaf hash
    # recomputed, and a head claiming another size.
    e = json.loads(lines[1])
    e["leaf"] = e["leaf"].replace('"kind":', '"kind" :', 1)
    e["leaf_hash"] = leaf_hash(e["leaf"].encode("utf-8")).hex()
    altered = [lines[0], json.dumps(e)] + lines[2:]
    try:
        verify_export(altered, head, key)
        raise Failed("an altered export verified")
    except Failed as err:
        check("an altered export fails", "rebuild the signed root" in str(err), str(err))
    forged = dict(head, tree_size=head["tree_size"] - 1)
    try:
        verify_export(lines, forged, key)
        raise Failed("a head with its size changed verified")
    except Failed as err:
        check("a head with its size changed fails", "signature" in str(err), str(err))


def main():
    cfg = json.load(sys.stdin)
    try:
        online(cfg)
        offline(cfg)
    except Failed as e:
        sys.stderr.write(f"FAILED: {e}\n")
        sys.exit(1)
    print(json.dumps(SUMMARY))


if __name__ == "__main__":
    main()
