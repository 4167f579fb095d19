"""An OpenAI-compatible HTTP gateway to llmsup: a process of its own that is a plain client
of llmsup's public ZeroMQ protocol (protocol/SPEC.md) and has no other way into workers.

    python -m llmsup.supervisor.gateway --endpoint ZMQ_ENDPOINT --listen HOST:PORT
        [--api-key-file PATH] [--allow-remote] [--max-body-bytes N] [--ready-fd FD]
        [--lanes N] [--node-name NAME] [--drain-health-s S]

--endpoint       llmsup's client endpoint, e.g. ipc:///tmp/llmsup-1000/client.sock
--listen         HOST:PORT to serve HTTP on ([::1]:PORT for IPv6; port 0: any free port).
                 A host that is not loopback is refused without --allow-remote.
--api-key-file   a file holding the API key (a regular file of this user, mode 0600 or
                 stricter, not a symlink), so the key never shows in `ps`. With it, every
                 route but /health needs `Authorization: Bearer KEY`, else 401.
--allow-remote   allow a non-loopback --listen; refused without --api-key-file.
--max-body-bytes request bodies over N bytes get 413 (default 4 MiB, the protocol's frame
                 limit).
--ready-fd       a pipe to write one byte to once listening (how llmsup's supervisor,
                 which spawns and restarts the gateway, knows it is up).
--lanes          connections to llmsup (default 8); a request uses the one its routing key
                 hashes to (`prompt_cache_key`, else `user`, else the first 256 bytes of its
                 prompt or messages), so llmsup's per-client queue bound and round-robin
                 apply per lane rather than to all HTTP clients.
--node-name      X-Llmsup-Node, sent on every response (default: the host name).
--drain-health-s on SIGTERM, once something has asked /health, /health answers 503 this
                 long (default 2 s) while requests are still served, so a balancer marks
                 the node down before it refuses; no wait if llmsup is gone or stopping.

Once listening it logs one line, `listening on http://HOST:PORT ...`, to stderr. SIGTERM
or SIGINT: after --drain-health-s, it stops accepting, sends llmsup `cancel` for every
generation request in flight (their clients get 503 or, mid-stream, an error event),
closes the connections within 2 s and exits 0. Exit status 2: a refused command line
(address, key file); 1: it could not listen.

Routes: GET /v1/models, GET /v1/models/{model}, POST /v1/completions, POST
/v1/chat/completions (streamed as server-sent events or whole), GET /health (200 while
llmsup answers and is not stopping, else 503) and GET /metrics (Prometheus).

Models: /v1/models lists the models llmsup serves (`llmsup start --model ...`, its
status' "models"), the default first. A request's `model` is llmsup's `model` (SPEC.md
3.1); absent or null, llmsup's default. A name llmsup does not serve gets OpenAI's answer
for an unknown model, 404 with code `model_not_found` and param `model`, listing the
served names: a placeholder some clients send ("gpt-3.5-turbo") is refused, not quietly
served by another model, so an answer never comes from a model its client did not ask
for. A response's "model" is the model that served it.

Modules, one job each: __main__ (command line, start-up, shutdown), app (routes),
openai_api (OpenAI requests to llmsup bodies, llmsup replies to OpenAI responses),
upstream (the ZeroMQ connections, each multiplexed by request id), metrics.
"""
