"""The llmsup wire vocabulary, defined once: every frame, verb, error code and limit.

SPEC.md beside this file is the contract for clients; this module is its Python mirror.
The supervisor-worker exchange (internal, never seen by clients) lives here too so that
both ends import the same bytes.
"""

# --- client <-> supervisor -------------------------------------------------------------
# A client message is four frames: VERSION, verb, request id, JSON body.
# A reply is four frames: VERSION, reply kind, the echoed request id, JSON body.
VERSION = b"LLMSUP1"
SUPPORTED_VERSIONS = (VERSION,)

# Request verbs.
COMPLETE = b"complete"
CHAT = b"chat"
TOKENIZE = b"tokenize"
PING = b"ping"
STATUS = b"status"
CANCEL = b"cancel"  # body {"target": request id}: cancel that request of this client
DETOKENIZE = b"detokenize"  # body {"tokens": [ids]}: their text (added within LLMSUP1)
EMBED = b"embed"  # body {"input": [texts]}: their embeddings (added within LLMSUP1)
VERBS = (COMPLETE, CHAT, TOKENIZE, PING, STATUS, CANCEL, DETOKENIZE, EMBED)
# Verbs that need a worker slot; the others are answered by the supervisor itself.
WORKER_VERBS = (COMPLETE, CHAT, TOKENIZE, DETOKENIZE, EMBED)

# Reply kinds. ACCEPTED comes at once when a generation request is admitted (it carries
# the supervisor's instance id); TOKEN is streamed zero or more times; while a request
# has had no frame for a HEARTBEAT_MS tick it gets QUEUED (waiting for a worker) or
# RUNNING (on a worker, e.g. reading its prompt): so a live request is never silent for
# more than 2 x HEARTBEAT_MS, and the sends tell the server whether the client is still
# there. DONE or ERROR ends the request, and exactly one of them is sent for every
# request the supervisor received. Clients ignore non-terminal kinds they do not know.
ACCEPTED = b"accepted"
TOKEN = b"token"
QUEUED = b"queued"
RUNNING = b"running"
DONE = b"done"
ERROR = b"error"
TERMINAL_KINDS = (DONE, ERROR)
HEARTBEAT_MS = 1000
# What a client should wait for the next frame of a request before taking the request
# (or the server) for lost: two heartbeats and room for a loaded machine (SPEC.md).
CLIENT_RECEIVE_TIMEOUT_MS = 5000

# Error codes: a fixed set. Each maps to what a client should do (see SPEC.md).
E_BAD_REQUEST = "bad_request"  # malformed frame, bad JSON or bad parameter: fix it
E_UNSUPPORTED_VERSION = "unsupported_version"  # speak a version the server lists
E_UNKNOWN_VERB = "unknown_verb"  # fix the client
E_DUPLICATE_ID = "duplicate_request_id"  # id already in flight from this client
E_OVERLOADED = "overloaded"  # retry after retry_after_ms
E_CONTEXT_OVERFLOW = "context_overflow"  # prompt does not fit: shorten it
E_WORKER_LOST = "worker_lost"  # the worker died mid-request: retry may succeed
E_WORKER_FAILED = "worker_failed"  # inference raised an error: do not retry blindly
E_SHUTTING_DOWN = "shutting_down"  # server is stopping: retry elsewhere or later
E_CANCELLED = "cancelled"  # the client cancelled it (or disconnected)
E_DEADLINE = "deadline_exceeded"  # its timeout_ms passed: in the queue or while generating
E_INTERNAL = "internal"  # a bug in llmsup: report it
ERROR_CODES = (
    E_BAD_REQUEST,
    E_UNSUPPORTED_VERSION,
    E_UNKNOWN_VERB,
    E_DUPLICATE_ID,
    E_OVERLOADED,
    E_CONTEXT_OVERFLOW,
    E_WORKER_LOST,
    E_WORKER_FAILED,
    E_SHUTTING_DOWN,
    E_CANCELLED,
    E_DEADLINE,
    E_INTERNAL,
)

# Finish reasons carried by DONE for generation verbs.
FINISH_STOP = "stop"  # end-of-generation token or a stop string
FINISH_LENGTH = "length"  # max_tokens reached or the context is full
FINISH_TOOL_CALLS = "tool_calls"  # a chat with tools answered with calls (its DONE has them)

# --- limits ------------------------------------------------------------------------------
MAX_REQUEST_ID_BYTES = 64
MAX_MODEL_NAME_BYTES = 64
MAX_PROMPT_BYTES = 1024 * 1024
# Structured output and tools (SPEC.md 3.11, 3.12). A schema or the tools are measured as
# compact JSON; depth and repetition bounds keep checking and converting them short.
MAX_GRAMMAR_BYTES = 64 * 1024
MAX_SCHEMA_BYTES = 64 * 1024
MAX_TOOLS_BYTES = 128 * 1024
MAX_TOOLS = 64
MAX_TOOL_NAME_CHARS = 64
MAX_PARALLEL_CALLS = 8  # calls in one answer with parallel_tool_calls: small models repeat
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_NODES = 4096
MAX_SCHEMA_REPEAT = 4096  # minItems, maxItems, minLength, maxLength; a pattern's {n,m}
MAX_LOGIT_BIAS = 300  # entries, as OpenAI's
MAX_LOGIT_BIAS_VALUE = 100.0
MAX_PENALTY = 2.0  # presence_penalty, frequency_penalty: -2.0 to 2.0, as OpenAI's
MAX_REPEAT_PENALTY = 2.0
# A frame holds a body whose prompt is at most MAX_PROMPT_BYTES of UTF-8 (a grammar, a
# schema and tools count toward it too). 4 MiB, as LLMSUP1 was released: an encoder that
# escapes non-ASCII (Python's json.dumps by default) writes 1 MiB of emoji as 3 MiB of
# \uXXXX pairs, which still fits with the other fields. A larger frame makes ZeroMQ drop
# the connection (SPEC.md 6.4). (It was lowered to 2 MiB + 64 KiB within LLMSUP1 for a
# while; a client written to the released SPEC then lost its connection: restored.)
MAX_FRAME_BYTES = 4 * 1024 * 1024
FRAMES_PER_REQUEST = 4  # a message with more is refused after reading its first frames
MAX_MESSAGES = 256
MAX_TOKENS_LIMIT = 32768
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MAX_TOP_K = 1000
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**32 - 1
MAX_TIMEOUT_MS = 24 * 3600 * 1000
# logprobs and echo (SPEC.md 3.13). top_logprobs as OpenAI's chat allows. An echo's
# prompt_logprobs go in one DONE frame: prompt tokens x (1 + top_logprobs) entries at most
# (about 100 bytes each), so it stays well under MAX_FRAME_BYTES.
MAX_TOP_LOGPROBS = 20
MAX_ECHO_ENTRIES = 16384
# n (complete, chat): completions of one prompt, each in a sequence of one worker, so at
# most a worker's slots (--slots-per-worker, checked at admission); this is the largest.
MAX_N = 64
MAX_DETOKENIZE_TOKENS = 131072  # ids in one detokenize: the largest --ctx-size
# embed (SPEC.md 3.15): inputs in one request, as OpenAI's limit; their texts together at
# most MAX_PROMPT_BYTES. The reply must fit one frame too: the worker refuses more inputs
# than that holds at the model's size (float: about 20 bytes a number, base64: 5.4).
MAX_EMBED_INPUTS = 2048
EMBED_ENCODINGS = ("float", "base64")  # base64: little-endian float32, as OpenAI's
# keep_alive_s (complete, chat): seconds a model stays loaded unused after a request;
# KEEP_ALIVE_FOREVER: not unloaded for being idle (SPEC.md 3.10).
MAX_KEEP_ALIVE_S = 365 * 24 * 3600
KEEP_ALIVE_FOREVER = -1
CHAT_ROLES = ("system", "user", "assistant", "tool")
TOOL_CHOICES = ("none", "auto", "required")  # or {"type": "function", "function": {"name"}}

# Defaults for sampling parameters a request leaves out.
DEFAULT_MAX_TOKENS = 128
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_REPEAT_LAST_N = 64  # llama.cpp's window for repeat_penalty

# --- supervisor <-> worker (internal) ------------------------------------------------------
# Worker -> supervisor: [W_READY, secret, json] once loaded; [W_FAILED, secret, json] if
# loading failed; [W_TOKEN | W_DONE | W_ERROR, job id, json] for a job, or several such
# triples in one message (a decoding step's, in order). W_DONE or W_ERROR ends the job and
# frees its slot; W_READY says how many slots the worker has. Codec: workerwire.py.
W_READY = b"READY"
W_FAILED = b"FAILED"
W_TOKEN = b"TOKEN"
W_DONE = b"DONE"
W_ERROR = b"ERROR"
W_JOB_KINDS = (W_TOKEN, W_DONE, W_ERROR)
# Supervisor -> worker: [S_JOB, job id, verb, json]; [S_DRAIN] finish current jobs, exit;
# [S_ABORT, job id, json {code, message}] stop that job now and answer it with W_ERROR.
# A job id is an 8-byte sequence number followed by the client's request id.
S_JOB = b"JOB"
S_DRAIN = b"DRAIN"
S_ABORT = b"ABORT"
