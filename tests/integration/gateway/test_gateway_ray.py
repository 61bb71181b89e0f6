"""The gateway in front of the inference service on a real local Ray Serve (one small module: Ray
is heavy on shared cores): the openai package's completion, whole and streamed, equals the
backend's own answer. (Hang-ups and deadlines are tested against the service's in-process
backend in test_gateway_openai.py, where the request's state is read without the replicas'
reporting delay.)"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from libs.common.clients.inference import InferenceClient
from tests.integration.gateway.stack import TINY, GatewayStack, call, save_tiny_model, start_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    home = tmp_path_factory.mktemp("llmp")
    save_tiny_model(home / "artifacts")
    env = {"LLMP_INFERENCE_RAY_NUM_CPUS": "2", "LLMP_INFERENCE_DASHBOARD": "false"}
    stack = start_stack(home, {"inference": env})
    try:
        body = {"path": TINY, "num_cpus": 0.5}
        assert call(stack, "POST", "/api/v1/served", stack.admin_key, body)[0] == 201
        yield stack
    finally:
        stack.close()


def test_completions_through_the_gateway_on_ray_serve(ray_stack: GatewayStack) -> None:
    direct = InferenceClient(ray_stack.services["inference"].address)
    expected = direct.generate("tiny", text="Hello", max_tokens=10, temperature=0, ignore_eos=True).completions[0]
    direct.close()
    with openai.OpenAI(base_url=ray_stack.http + "/v1", api_key=ray_stack.admin_key, max_retries=0) as client:
        options = {"model": "tiny", "prompt": "Hello", "max_tokens": 10, "temperature": 0}
        whole = client.completions.create(**options, extra_body={"ignore_eos": True})
        chunks = list(client.completions.create(**options, stream=True, extra_body={"ignore_eos": True}))
        assert [m.id for m in client.models.list().data] == ["tiny"]
    assert whole.choices[0].text == expected.text and whole.usage.completion_tokens == 10
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
