"""Random and adversarial calls to every RPC of every service, with real requests in flight beside them.

Requests are drawn from the generated descriptors (tests/fuzz/strategies.py), so a new RPC or
field is fuzzed without a line here. For every call:

- the status is never INTERNAL or UNKNOWN (bad input is refused as what it is), and never
  DEADLINE_EXCEEDED (nothing hangs, and nothing a random call starts outlasts its deadline);
- the service is still SERVING afterwards;
- the service's companion request (services.py) keeps getting its one correct answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from llmp.inference.v1 import inference_pb2
from llmp.retrieval.v1 import retrieval_pb2
from llmp.tokenizer.v1 import tokenizer_pb2
from llmp.training.v1 import training_pb2

from libs.common.rpc.client import health_status
from tests.fuzz.services import CALLS, Targets
from tests.fuzz.strategies import messages, mutations

pytestmark = [pytest.mark.integration, pytest.mark.fuzz]

DEADLINE_S = 60.0
#: Responses read from a server stream before the fuzzer hangs up (a hang-up is a fine way to end).
STREAM_ITEMS = 20
BROKEN = {"INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"}

SERVICES: dict[str, ServiceDescriptor] = {
    "tokenizer": tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"],
    "retrieval": retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"],
    "training": training_pb2.DESCRIPTOR.services_by_name["TrainingService"],
    "inference": inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
}
RPCS = [(service, method.name) for service, d in SERVICES.items() for method in d.methods]
#: RPCs whose request has fields: they share the examples (one with no field has a single request).
WITH_FIELDS = sum(1 for d in SERVICES.values() for method in d.methods if method.input_type.fields)

#: Known failures of another service's open work, by "service.Method": the reason (the bug).
KNOWN: dict[str, str] = {}


def _params() -> list[Any]:
    out = []
    for service, method in RPCS:
        reason = KNOWN.get(f"{service}.{method}")
        marks = [pytest.mark.xfail(reason=reason, strict=False)] if reason else []
        out.append(pytest.param(service, method, id=f"{service}.{method}", marks=marks))
    return out


def invoke(channel: grpc.Channel, service: ServiceDescriptor, method: MethodDescriptor, requests: list[Message]) -> str:
    """Send the requests (all of them on a client stream, else the first); the status code's name."""
    path = f"/{service.full_name}/{method.name}"
    response = message_factory.GetMessageClass(method.output_type)
    args: dict[str, Callable[..., Any]] = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": response.FromString,
    }
    client_stream, server_stream = method.client_streaming, method.server_streaming
    kind = {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary"}.get(
        (client_stream, server_stream), "stream_stream"
    )
    callable_ = getattr(channel, kind)(path, **args)
    payload = iter(requests) if client_stream else requests[0]
    try:
        if not server_stream:
            callable_(payload, timeout=DEADLINE_S)
            return "OK"
        stream = callable_(payload, timeout=DEADLINE_S)
        for i, _ in enumerate(stream):
            if i + 1 >= STREAM_ITEMS:
                stream.cancel()
                return "OK"
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


@pytest.mark.parametrize(("service", "method"), _params())
def test_random_calls_are_refused_or_served(service: str, method: str, targets: Targets, fuzz_examples: int) -> None:
    target, companion = targets.get(service)
    descriptor = SERVICES[service]
    rpc = descriptor.methods_by_name[method]
    one = messages(rpc.input_type, target.words)
    if method in target.bases:
        one = st.one_of(one, mutations(target.bases[method], target.words))
    requests = st.lists(one, min_size=1, max_size=3) if rpc.client_streaming else one.map(lambda m: [m])
    channel = grpc.insecure_channel(target.process.address)
    if target.restore is not None:
        target.restore(channel)

    @settings(
        max_examples=max(1, -(-fuzz_examples // WITH_FIELDS)),  # rounded up: at least fuzz_examples in all
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as drawn
        suppress_health_check=list(HealthCheck),
    )
    @given(requests)
    def one_call(drawn: list[Message]) -> None:
        code = invoke(channel, descriptor, rpc, drawn)
        CALLS[(f"{service}.{method}", code)] += 1
        shown = repr(drawn)[:2000]
        assert code not in BROKEN, f"{service}.{method} answered {code} to {shown}"
        status = health_status(target.process.address, timeout_s=10)
        assert status == "SERVING", f"{service} is {status} after {method}({shown})"

    try:
        one_call()
    finally:
        channel.close()
    companion.check_once()
    assert not companion.failures, f"the real {service} request failed beside the fuzzer: {companion.failures[:5]}"
    assert companion.done > 0
