"""Drives the official openai SDK exactly as a workload would: configured only by the
OPENAI_API_KEY / OPENAI_BASE_URL variables from a ProxyToken's Secret.

Prints one JSON object: the completion text, the streamed pieces, and the wall-clock
time at which the first streamed chunk reached this client.
"""

import json
import time

import openai

client = openai.OpenAI()  # reads OPENAI_API_KEY and OPENAI_BASE_URL from the environment

completion = client.chat.completions.create(
    model="fake-model", messages=[{"role": "user", "content": "hello"}]
)

pieces = []
first_chunk_at = None
stream = client.chat.completions.create(
    model="fake-model",
    messages=[{"role": "user", "content": "stream please"}],
    stream=True,
    extra_headers={"x-fake-chunks": "5", "x-fake-chunk-delay-ms": "300"},
)
for chunk in stream:
    if first_chunk_at is None:
        first_chunk_at = time.time()
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)

error = None
try:
    openai.OpenAI(api_key="llmp_not-a-real-token").models.list()
except openai.AuthenticationError as e:
    error = {"status": e.status_code, "code": e.code, "message": e.message}

# Vector stores and conversations, by the paths the SDK calls (answers left unparsed:
# the fake upstream answers every other path with a chat completion).
surface = [
    client.vector_stores.with_raw_response.search("vs_abc", query="q").status_code,
    client.vector_stores.files.with_raw_response.delete("file-abc", vector_store_id="vs_abc").status_code,
    client.conversations.items.with_raw_response.list("conv_abc").status_code,
]

print(json.dumps({
    "content": completion.choices[0].message.content,
    "usage": completion.usage.total_tokens,
    "pieces": pieces,
    "first_chunk_at": first_chunk_at,
    "error": error,
    "surface": surface,
}))
