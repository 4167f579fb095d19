"""An OpenAI-compatible HTTP gateway to llmsup: a process of its own that is a plain client
of llmsup's public ZeroMQ protocol (protocol/SPEC.md) and has no other way into workers.

    python -m llmsup.supervisor.gateway --endpoint ZMQ_ENDPOINT --listen HOST:PORT [...]

Its arguments, their defaults and limits are in `--help`, built from the settings
declaration (supervisor/settings.py) that `llmsup start` passes them on from.

Once listening it logs one line, `listening on http://HOST:PORT ...`, to stderr. SIGTERM
or SIGINT: after --drain-health-s, it stops accepting, sends llmsup `cancel` for every
generation request in flight (their clients get 503 or, mid-stream, an error event),
closes the connections within 2 s and exits 0. Exit status 2: a refused command line
(address, key file); 1: it could not listen.

Routes: GET /v1/models, GET /v1/models/{model}, POST /v1/completions, POST
/v1/chat/completions (streamed as server-sent events or whole), GET /health (200 while
llmsup answers and is not stopping, else 503) and GET /metrics (Prometheus); and Ollama's
/api/generate, /api/chat, /api/tags, /api/show, /api/ps, /api/version, /api/embed and
/api/embeddings (ollama_api.py). --cors-origin lets browser pages of those origins in
(cors.py).

Models: /v1/models lists the models llmsup serves (`llmsup start --model ...`, its
status' "models"), the default first. A request's `model` is llmsup's `model` (SPEC.md
3.1); absent or null, llmsup's default. A name llmsup does not serve gets OpenAI's answer
for an unknown model, 404 with code `model_not_found` and param `model`, listing the
served names: a placeholder some clients send ("gpt-3.5-turbo") is refused, not quietly
served by another model, so an answer never comes from a model its client did not ask
for. A response's "model" is the model that served it.

Modules, one job each: __main__ (command line, start-up, shutdown), app (the middleware
and the small routes), generate (the completion routes, whole or streamed), openai_api
(OpenAI requests to llmsup jobs), responses (llmsup replies as OpenAI responses), errors
(llmsup error codes as HTTP statuses), ollama_api (Ollama's API), cors (cross-origin
requests), state (what the routes share), upstream (the
connections to llmsup, each multiplexed by request id), zmtp (its own ZMTP link), metrics.
"""
