"""Wire-level tests of the scripted vLLM-compatible server, driven by the official openai SDK."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from relay_agents.testing import ScriptedServer, tokenize

STUDENT = "Let me see: 12*34 = <call>2</call> never-reached"


@pytest.fixture(scope="module")
def srv():
    with ScriptedServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _reset(srv):
    srv.reset()
    srv.script(model="student", match="Q1", responses=[STUDENT, " So \\boxed{408}."])
    srv.script(model="teacher", match="Q1", responses=[" 408. extra words"])


@pytest.fixture
async def client(srv):
    client = openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
    yield client
    await client.close()


async def complete(client, prompt="Q1: what is 12*34?", model="student", **kw):
    return await client.completions.create(model=model, prompt=prompt, **kw)


def test_tokenize_is_lossless_with_single_token_specials():
    assert tokenize(STUDENT)[10:14] == [" ", "<call>", "2", "</call>"]
    assert tokenize("ab 12") == ["ab", " 1", "2"]
    for text in [STUDENT, "<|im_start|>user\nhi<|im_end|>\n", "a  <b>\t\n!"]:
        assert "".join(tokenize(text)) == text


async def test_stop_string_kept(client):
    resp = await complete(client, stop=["</call>"], extra_body={"include_stop_str_in_output": True})
    choice = resp.choices[0]
    assert choice.text == "Let me see: 12*34 = <call>2</call>"
    assert (choice.finish_reason, choice.stop_reason) == ("stop", "</call>")
    assert resp.object == "text_completion" and resp.model == "student"
    assert resp.usage.completion_tokens == len(tokenize(choice.text))
    assert resp.usage.prompt_tokens == len(tokenize("Q1: what is 12*34?"))
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # the script advances: the student resumes with its second response
    resp = await complete(client, prompt="Q1 ... <call>2</call> 40")
    assert resp.choices[0].text == " So \\boxed{408}."
    # exhausted -> default response
    resp = await complete(client)
    assert resp.choices[0].text == "I am a scripted model."


async def test_stop_string_not_kept_and_spanning_tokens(srv, client):
    resp = await complete(client, stop="</call>")
    assert resp.choices[0].text == "Let me see: 12*34 = <call>2"
    assert resp.choices[0].stop_reason == "</call>"
    assert resp.usage.completion_tokens == len(tokenize("Let me see: 12*34 = <call>2</call>"))
    srv.script(model="student", match="Q1", responses=[STUDENT])
    srv_text = "Let me see: 1"  # "e: 1" spans the tokens " see", ":", " 1"
    resp = await complete(client, stop=["zzz", "e: 1"])
    assert resp.choices[0].text == "Let me se"
    assert resp.choices[0].stop_reason == "e: 1"
    assert resp.usage.completion_tokens == len(tokenize(srv_text))


async def test_max_tokens_and_eos(client):
    resp = await complete(client, max_tokens=3)
    assert resp.choices[0].text == "Let me see"
    assert (resp.choices[0].finish_reason, resp.choices[0].stop_reason) == ("length", None)
    resp = await complete(client, model="teacher", max_tokens=2)  # the relay teacher call
    assert resp.choices[0].text == " 40"
    assert resp.choices[0].finish_reason == "length"


async def test_eos_and_exact_length(srv, client):
    srv.script(model="teacher", match="Q1", responses=[" 408. extra words"] * 2)
    resp = await complete(client, model="teacher")
    assert resp.choices[0].text == " 408. extra words"
    assert (resp.choices[0].finish_reason, resp.choices[0].stop_reason) == ("stop", None)
    assert resp.usage.completion_tokens == 6
    resp = await complete(client, model="teacher", max_tokens=6)  # no room left for EOS
    assert resp.choices[0].finish_reason == "length"


async def test_usage_counts_the_eos_as_vllm_when_configured(srv, client):
    srv.script(model="teacher", match="Q1", responses=[" 408. extra words"] * 4)
    assert srv.configure(usage_counts_eos=True)["usage_counts_eos"] is True
    whole = await complete(client, model="teacher")
    assert whole.choices[0].text == " 408. extra words"
    assert whole.usage.completion_tokens == 6 + 1  # the EOS token, not in the text
    stream = await complete(client, model="teacher", stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage.completion_tokens == 7
    cut = await complete(client, model="teacher", max_tokens=6)  # no EOS: nothing more to count
    assert (cut.choices[0].finish_reason, cut.usage.completion_tokens) == ("length", 6)
    stopped = await complete(client, stop=["</call>"], extra_body={"include_stop_str_in_output": True})
    assert stopped.choices[0].stop_reason == "</call>"  # a stop string is no EOS
    assert stopped.usage.completion_tokens == len(tokenize("Let me see: 12*34 = <call>2</call>"))


async def test_streaming_chunks_and_usage(client):
    stream = await complete(
        client,
        stream=True,
        stop=["</call>"],
        stream_options={"include_usage": True},
        extra_body={"include_stop_str_in_output": True},
    )
    chunks = [chunk async for chunk in stream]
    text_chunks, final, usage = chunks[:-2], chunks[-2], chunks[-1]
    expected = "Let me see: 12*34 = <call>2</call>"
    assert [c.choices[0].text for c in text_chunks] == tokenize(expected)
    assert all(c.choices[0].finish_reason is None for c in text_chunks)
    assert (final.choices[0].finish_reason, final.choices[0].stop_reason) == ("stop", "</call>")
    assert usage.choices == [] and usage.usage.completion_tokens == len(tokenize(expected))
    assert {c.object for c in chunks} == {"text_completion"} and len({c.id for c in chunks}) == 1


async def test_streaming_cut_stop_string_is_never_emitted(client):
    stream = await complete(client, stream=True, stop=["e: 1"])
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == "Let me se"


async def test_chat_rendering_and_continue_final_message(srv, client):
    srv.script(model="student", match="Q2", responses=["Hi there.", " 2 = <call>1</call> x"])
    resp = await client.chat.completions.create(model="student", messages=[{"role": "user", "content": "Q2"}])
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "Hi there."
    prompt = "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"
    assert srv.requests()[-1]["prompt"] == prompt
    assert resp.usage.prompt_tokens == len(tokenize(prompt))

    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "Hi there. 1 +"},
    ]
    stream = await client.chat.completions.create(
        model="student",
        messages=messages,
        stream=True,
        stop=["</call>"],
        extra_body={
            "continue_final_message": True,
            "add_generation_prompt": False,
            "include_stop_str_in_output": True,
        },
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " 2 = <call>1</call>"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].object == "chat.completion.chunk"
    assert srv.requests()[-1]["prompt"] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\nHi there. 1 +"
    )
    with pytest.raises(openai.BadRequestError):  # vLLM rejects both flags together
        await client.chat.completions.create(
            model="student", messages=messages, extra_body={"continue_final_message": True}
        )


async def test_call_suppression(srv, client):
    resp = await complete(client, extra_body={"bad_words": ["<call>"]})
    assert resp.choices[0].text == "Let me see: 12*34 =  never-reached"
    async with httpx.AsyncClient(base_url=srv.url) as http:
        ids = (await http.post("/tokenize", json={"model": "student", "prompt": "<call>"})).json()
    assert ids["tokens"] == [1]
    srv.script(model="student", match="Q1", responses=[STUDENT])
    resp = await complete(client, logit_bias={"1": -100})
    assert "<call>" not in resp.choices[0].text
    assert resp.choices[0].finish_reason == "stop"


async def test_http_status_faults_do_not_consume_the_script(srv, client):
    srv.faults(model="student", faults=["429", "500", "503"])
    with pytest.raises(openai.RateLimitError) as err:
        await complete(client)
    assert err.value.body["code"] == 429
    with pytest.raises(openai.InternalServerError):
        await complete(client)
    with pytest.raises(openai.InternalServerError) as err:
        await complete(client, stream=True)
    assert err.value.status_code == 503
    assert (await complete(client)).choices[0].text == STUDENT
    srv.script(model="teacher", match="Q9", responses=[{"fault": "429"}, "ok"])
    with pytest.raises(openai.RateLimitError):
        await complete(client, model="teacher", prompt="Q9")
    assert (await complete(client, model="teacher", prompt="Q9")).choices[0].text == "ok"


async def test_hang_fault_times_out(srv, client):
    srv.faults(model="teacher", faults=["hang", "hang"])
    with pytest.raises(openai.APITimeoutError):
        await complete(client.with_options(timeout=0.5), model="teacher")
    with pytest.raises(openai.APITimeoutError):
        await complete(client.with_options(timeout=0.5), model="teacher", stream=True)
    assert (await complete(client, model="teacher")).choices[0].text == " 408. extra words"


async def test_drop_fault(srv, client):
    srv.faults(model="student", faults=["drop", "drop"])
    with pytest.raises(openai.APIConnectionError):
        await complete(client)
    stream = await complete(client, stream=True)
    received = []
    with pytest.raises(Exception) as err:
        async for chunk in stream:
            received.append(chunk.choices[0].text)
    assert received == ["Let", " me"]
    assert not isinstance(err.value, AssertionError)
    assert (await complete(client)).choices[0].text == STUDENT  # the retry gets everything


async def test_malformed_fault(srv, client):
    srv.faults(model="student", faults=["malformed", "malformed"])
    with pytest.raises(Exception) as err:
        await complete(client)
    assert not isinstance(err.value, AssertionError)
    with pytest.raises(Exception) as err:
        stream = await complete(client, stream=True)
        async for _ in stream:
            pass
    assert not isinstance(err.value, AssertionError)


async def test_validation_errors(client):
    with pytest.raises(openai.BadRequestError):
        await complete(client, n=0)
    with pytest.raises(openai.BadRequestError):
        await complete(client, n=2, stream=True)  # n > 1 is answered whole only
    with pytest.raises(openai.BadRequestError):
        await complete(client, max_tokens=40000)


async def test_n_replies_are_the_next_scripted_answers_in_one_body(srv, client):
    srv.script("student", "Q7", ["one", "two", "three"])
    resp = await complete(client, prompt="Q7", n=3)
    assert [(c.index, c.text) for c in resp.choices] == [(0, "one"), (1, "two"), (2, "three")]
    assert resp.usage.completion_tokens == 3 and resp.usage.prompt_tokens == len(tokenize("Q7"))


async def test_tokenize_detokenize_round_trip(srv):
    text = "<|im_start|>user\nQ1: 12*34 = <call>2</call><|im_end|>\n"
    async with httpx.AsyncClient(base_url=srv.url) as http:
        tok = (await http.post("/tokenize", json={"model": "m", "prompt": text})).json()
        assert tok["count"] == len(tokenize(text)) == len(tok["tokens"])
        assert tok["max_model_len"] > 0
        back = (await http.post("/detokenize", json={"model": "m", "tokens": tok["tokens"]})).json()
        assert back["prompt"] == text
        again = (await http.post("/tokenize", json={"model": "m", "prompt": text})).json()
        assert again["tokens"] == tok["tokens"]
        chat = await http.post(
            "/tokenize", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        )
        prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        assert chat.json()["count"] == len(tokenize(prompt))
        for special in (True, False):  # the emulated tokenizer, as Qwen's, adds no BOS to a text
            body = {"model": "m", "prompt": " 408.", "add_special_tokens": special}
            assert (await http.post("/tokenize", json=body)).json()["count"] == 4
        bad = await http.post("/tokenize", json={"model": "m", "prompt": "x", "add_special_tokens": "no"})
        assert bad.status_code == 400
        assert (await http.post("/detokenize", json={"tokens": [10**9]})).status_code == 400


async def test_models_health_and_request_log(srv, client):
    await complete(client, model="teacher", prompt="Q1 teacher prompt", max_tokens=2)
    await complete(client, model="someone-else")
    models = {m.id for m in (await client.models.list()).data}
    assert {"student", "teacher", "someone-else"} <= models
    log = srv.requests()
    assert [r["model"] for r in log] == ["teacher", "someone-else"]
    assert log[0]["path"] == "/v1/completions"
    assert log[0]["prompt"] == "Q1 teacher prompt" and log[0]["body"]["max_tokens"] == 2
    async with httpx.AsyncClient(base_url=srv.url) as http:
        assert (await http.get("/health")).status_code == 200


async def test_concurrent_streams_get_their_own_scripts(srv, client):
    n = 50
    for i in range(n):
        srv.script(model="student", match=f"<conv-{i}>", responses=[f"answer {i} is {i * 7}."])
    srv.configure(ttft_s=0.05, token_interval_s=0.01)

    async def one(i):
        stream = await complete(client, prompt=f"<conv-{i}> go", stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    texts = await asyncio.gather(*(one(i) for i in range(n)))
    assert texts == [f"answer {i} is {i * 7}." for i in range(n)]


async def test_latency(srv, client):
    srv.configure(latency_s=0.3)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await complete(client)
    assert loop.time() - start >= 0.3


def test_controller_lifecycle():
    server = ScriptedServer().start()
    proc = server.process
    assert server.running and server.base_url.endswith("/v1")
    server.stop()
    assert proc.poll() is not None and not server.running
    with pytest.raises(ValueError), ScriptedServer() as other:
        other.faults(model="m", faults=["explode"])
