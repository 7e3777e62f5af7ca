"""Query ``examples/serve.sh``'s server with the server default and per-request overrides.

python examples/client.py [--base-url http://127.0.0.1:8000/v1]
"""

from __future__ import annotations

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")
    messages = [{"role": "user", "content": "what is the best way home"}]
    overrides = {
        "server default (small thinks, full answers)": None,
        "full model throughout": {"elastic_budget": "full"},
        "small -> full, exact recompute": {
            "elastic_think_budget": "small",
            "elastic_answer_budget": "full",
            "elastic_kv_mode": "recompute",
        },
    }
    for label, xargs in overrides.items():
        body = {"thinking_token_budget": 24}  # vLLM's own cap forces </think>
        if xargs:
            body["vllm_xargs"] = xargs
        r = client.chat.completions.create(
            model="elastic", messages=messages, max_tokens=48, temperature=0, extra_body=body
        )
        msg = r.choices[0].message
        print(f"== {label}")
        print(f"   reasoning: {(msg.model_extra or {}).get('reasoning', '')[:60]!r}")
        print(f"   answer:    {(msg.content or '')[:60]!r}")
        print(f"   usage:     {r.usage.model_extra.get('elastic')}")
    try:
        client.completions.create(
            model="elastic", prompt="hello", max_tokens=4,
            extra_body={"vllm_xargs": {"elastic_budget": "huge"}},
        )  # fmt: skip
    except openai.BadRequestError as e:
        print(f"== unknown budget -> HTTP {e.status_code}: {e.message[:90]}")


if __name__ == "__main__":
    main()
