"""Online serving with Ray Serve (docs/serving.md): an HTTP ingress and two model deployments.

    app.py          the FastAPI ingress, the request pipeline, build_app / make_app, start
    deployments.py  MLLMDeployment (stages 1 + 2) and SAMDeployment (stage 3): replicas batching
                    concurrent requests (Serve names MLLM and SAM, which serve_configs/*.yaml use)
    schema.py       the HTTP contract: response models, errors, request parsing
    settings.py     ServeSettings (the `args:` of a Serve config), the checkpoint check, what is served
                    (/healthz) and the model part a replica loads
    examples.py     the web page's example gallery (synthetic scenes, scikit-image photographs)
    client.py       segment_remote: the Python client of the HTTP API

Launch: `ppcr serve [--config serve_configs/tiny_cpu.yaml]` or `serve run serve_configs/tiny_cpu.yaml`
(import_path `ppcr.serve:build_app`). The web page itself is plain HTML/CSS/JS in ppcr/web/.
"""

_LAZY = {
    "Pipeline": "app",
    "build_app": "app",
    "demo_serving": "app",
    "free_port": "app",
    "make_app": "app",
    "read_serve_config": "app",
    "start": "app",
    "wait_healthy": "app",
    "ServeStartError": "app",
    "ServerError": "client",
    "ServerUnreachable": "client",
    "segment_remote": "client",
    "HTTPError": "schema",
    "ServeSettings": "settings",
    "check_checkpoint": "settings",
    "describe_model": "settings",
    "load_serving_model": "settings",
    "resolve_settings": "settings",
}


def __getattr__(name: str):
    # Lazy: the HTTP client (`ppcr segment --server`) must not import Ray Serve, FastAPI or torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
