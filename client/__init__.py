"""The client side of the API: what the terminal chat, the chat page's state, the benchmarks
and the tests share. Plain Python over httpx and httpx-sse: no Ray, no torch.

    stream.py         reading an OpenAI streaming reply: SSE events, [DONE], error events
    bodies.py         OpenAI chat request bodies
    conversation.py   a conversation's turns and the messages the model sees
    servers.py        a free local port, waiting for a server's /health
    cli.py            the terminal chat (`python -m client.cli`)
"""
