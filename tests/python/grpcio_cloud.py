"""A Lumos cloud written with Python grpcio, for the interop test (tests/interop_grpcio.rs).

Stubs are generated from proto/ by grpcio-tools when this script starts, as a Python team
would. It accepts one agent, checks its Hello, waits for an inventory with the example
connector, sends calls (one chunked), acks the results, sends a stray Cancel, and prints a
JSON report on stdout as `REPORT {...}`, then exits.

Usage: python grpcio_cloud.py <proto root> <agent token>
"""

import json
import os
import queue
import sys
import tempfile
import threading
from concurrent import futures

import grpc
from grpc_tools import protoc

proto_root, token = sys.argv[1], sys.argv[2]
# Removed when the script ends, however it ends (a TemporaryDirectory cleans up at exit).
stubs = tempfile.TemporaryDirectory(prefix="lumos-grpcio-stubs-")
out_dir = stubs.name
status = protoc.main([
    "grpc_tools.protoc",
    f"-I{proto_root}",
    f"--python_out={out_dir}",
    f"--grpc_python_out={out_dir}",
    "lumos/agent/v1/tunnel.proto",
])
if status != 0:
    sys.exit(f"protoc failed with {status}")
sys.path.insert(0, out_dir)
from lumos.agent.v1 import tunnel_pb2 as pb  # noqa: E402
from lumos.agent.v1 import tunnel_pb2_grpc as pb_grpc  # noqa: E402

CHUNK = 4096
report = {"errors": []}
done = threading.Event()


def expect(condition, message):
    if not condition:
        report["errors"].append(message)


class Cloud(pb_grpc.AgentTunnelServicer):
    def Connect(self, request_iterator, context):
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != f"Bearer {token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown agent token")
        inbound = queue.Queue()

        def read():
            try:
                for message in request_iterator:
                    inbound.put(message)
            except grpc.RpcError:
                pass
            inbound.put(None)

        threading.Thread(target=read, daemon=True).start()
        first = inbound.get(timeout=60)
        expect(first is not None and first.WhichOneof("message") == "hello", "first message is not Hello")
        hello = first.hello
        report["hello"] = {
            "agent_id": hello.agent_id,
            "agent_version": hello.agent_version,
            "protocol_version": hello.protocol_version,
            "cluster_id": hello.cluster_id,
            "os": hello.os,
            "max_concurrent_calls": hello.max_concurrent_calls,
        }
        yield pb.CloudMessage(welcome=pb.Welcome(
            session_id="grpcio-session", heartbeat_interval_ms=1000, max_chunk_size=CHUNK))

        def next_message(kind, timeout=60):
            while True:
                message = inbound.get(timeout=timeout)
                if message is None:
                    raise RuntimeError(f"stream ended while waiting for {kind}")
                if message.WhichOneof("message") == kind:
                    return message

        inventory = next_message("inventory").inventory
        while not any(c.app_id == "lumos_example" and c.status == pb.CONNECTOR_STATUS_READY
                      for c in inventory.connectors):
            inventory = next_message("inventory").inventory
        report["inventory"] = [
            {"app_id": c.app_id, "version": c.version, "kind": pb.ConnectorKind.Name(c.kind),
             "status": pb.ConnectorStatus.Name(c.status), "file_name": c.file_name,
             "capabilities": json.loads(c.info or b"{}").get("capabilities", [])}
            for c in inventory.connectors
        ]

        results = {}

        def collect(call_id):
            parts = []
            while True:
                chunk = next_message("call_result").call_result
                if chunk.call_id != call_id:
                    continue
                expect(chunk.seq == len(parts), f"{call_id}: chunk {chunk.seq} out of order")
                expect(len(chunk.data) <= CHUNK, f"{call_id}: chunk over max_chunk_size")
                parts.append(chunk.data)
                if chunk.last:
                    results[call_id] = {
                        "status": pb.CallStatus.Name(chunk.status),
                        "chunks": len(parts),
                        "document": json.loads(b"".join(parts)),
                    }
                    return

        # A call whose envelope is larger than one chunk: sent in pieces.
        envelope = json.dumps({
            "request": {},
            "settings": {"padding": "x" * (3 * CHUNK)},
            "auth": {"oauth": {"access_token": "grpcio-interop-token"}},
        }).encode()
        pieces = [envelope[i:i + CHUNK] for i in range(0, len(envelope), CHUNK)]
        for seq, piece in enumerate(pieces):
            yield pb.CloudMessage(call_request=pb.CallRequest(
                call_id="py-1", app_id="lumos_example", capability="validate_credentials",
                tenant_id="", deadline_ms=30000, payload=piece, seq=seq,
                last=seq == len(pieces) - 1))
        collect("py-1")
        yield pb.CloudMessage(result_ack=pb.ResultAck(call_id="py-1"))

        # A paged list, and a call for a connector that does not exist.
        yield pb.CloudMessage(call_request=pb.CallRequest(
            call_id="py-2", app_id="lumos_example", capability="list_accounts",
            payload=json.dumps({"request": {}, "page": {"size": 2}}).encode(), seq=0, last=True))
        collect("py-2")
        yield pb.CloudMessage(result_ack=pb.ResultAck(call_id="py-2"))
        yield pb.CloudMessage(call_request=pb.CallRequest(
            call_id="py-3", app_id="no_such_app", capability="list_accounts",
            payload=b"{}", seq=0, last=True))
        collect("py-3")
        yield pb.CloudMessage(result_ack=pb.ResultAck(call_id="py-3"))
        # Harmless by contract.
        yield pb.CloudMessage(cancel=pb.Cancel(call_id="never-existed"))
        yield pb.CloudMessage(heartbeat=pb.Heartbeat(sent_at_ms=0))
        report["results"] = results
        heartbeat = next_message("heartbeat", timeout=10)
        report["agent_heartbeat"] = heartbeat.heartbeat.sent_at_ms > 0
        done.set()


server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
pb_grpc.add_AgentTunnelServicer_to_server(Cloud(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(f"PORT {port}", flush=True)
if not done.wait(timeout=float(os.environ.get("GRPCIO_CLOUD_TIMEOUT", "120"))):
    report["errors"].append("timed out")
print("REPORT " + json.dumps(report), flush=True)
server.stop(grace=1)
