"""The configurations of the API tests' shared servers (the ``api_server`` and ``apis_server``
fixtures), also served by other servers that run the same API tests (a cluster)."""

API_SERVER_CONFIG = {
    "server": {"concurrency": 8},
    "http": {"keepalive_interval": 0.1},
    "models": {
        "chat": {"engine": "fake", "slots": 4},
        "slow": {"engine": "fake", "token_delay": 0.05, "reply": " ".join(["word"] * 200)},
        "lazy": {"engine": "fake", "load_delay": 0.5, "ttl": 0},
        "embed": {"engine": "fake", "task": "embedding"},
        "whisper": {"engine": "fake", "task": "speech-to-text"},
    },
}

THINKING_TEMPLATE = (
    "{# answers may open a <think> block #}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
OPENING_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)

APIS_SERVER_CONFIG = {
    "server": {"concurrency": 8},
    "http": {"keepalive_interval": 0.1},
    "models": {
        "chat": {"engine": "fake", "slots": 2},
        "thinker": {
            "engine": "fake",
            "chat_template": THINKING_TEMPLATE,
            "reply": "<think> the user greets me so I greet back </think> Hello there",
        },
        "opener": {
            "engine": "fake",
            "chat_template": OPENING_TEMPLATE,
            "reply": "pondering this for a while </think> Done",
        },
        "ranker": {"engine": "fake", "task": "rerank"},
        "embed": {"engine": "fake", "task": "embedding"},
    },
}
