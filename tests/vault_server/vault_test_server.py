#!/usr/bin/python3
"""A Vault-API test server for kmsplugin's vault key source.

It follows Vault's documented HTTP API (see /work/shared/reference/backends.md part A) for what the key source uses:
transit keys create/read/rotate/config, encrypt/decrypt with key_version and associated_data (AES-256-GCM96,
"vault:vN:" + base64(nonce || ct || tag)), token/AppRole/JWT/cert login, renew-self, lookup-self, TTL expiry,
namespaces (X-Vault-Namespace), sys/health, `{"errors":[...]}` bodies.

One process serves N API listeners (an "HA cluster" with shared storage) and one plain-HTTP control listener on
loopback. Ports are chosen at run time (bind 0) and written as JSON to --ready-file:
    {"api": [port, ...], "control": port}

Control channel (POST http://127.0.0.1:<control>/control, JSON body; "listener": index, default 0; several keys
may be combined):
    sealed: bool            503 {"errors":["Vault is sealed"]} for every /v1 path but sys/health
    standby_redirect: str   307 to <str><path> (or "" to stop)
    fail_status, fail_count[, fail_path]: the next fail_count requests (whose path contains fail_path) answer
                            fail_status (on every listener if "all": true)
    rate_limit_count, retry_after: the next N requests answer 429 (with Retry-After if retry_after is given)
    delay: float seconds before each answer
    hang: bool              accept and read the request, never answer (until hang is cleared)
    close: bool             stop listening (connection refused) and drop open connections
    revoke_tokens: true     revoke every token except the root token
    add_token: {id, ttl, renewable, max_ttl, policies}
    set_token_ttl: {id, ttl}  what Vault now says is left of that token's TTL (lookup-self data.ttl), as after a
                            suspended host or an operator's change; ttl <= 0 expires it at once, so every request
                            with it gets 403 "permission denied" + "invalid token" (vault#26687)
    policy: {name, paths: {path: [capability, ...]}}   an ACL policy. A token that holds at least one policy defined
                            here is checked against them (plus Vault's built-in "default" policy, which grants
                            lookup-self and renew-self); a denial is 403 {"errors":["1 error occurred:\n\t*
                            permission denied\n\n"]}, with no "invalid token". Tokens whose policies are all
                            undefined here (the default "default","kms") may do everything, as before. Paths match
                            exactly, or by prefix when they end in "*"; GET needs read, POST/PUT update (create for
                            a key that does not exist yet), DELETE delete, LIST list.
    approle: {mount, role_id, secret_id}
    jwt_role: {mount, role, jwt}
    cert_role: {mount, name}
    token_ttl / token_max_ttl: TTLs of tokens issued by logins
    create_key: {namespace, mount, name}, delete_key: {...}, key_config: {...,min_decryption_version, min_encryption_version}
    reset_stats: true
GET /stats -> {"listeners": [{"connections": n, "requests": {path: n}}, ...]}

A Vault server that is killed and started again keeps its storage, comes back on its configured address, and
starts sealed until it is unsealed ("When a Vault server is started, it starts in a sealed state",
developer.hashicorp.com/vault/docs/concepts/seal). To play that: --state-file F keeps the storage (keys with their
versions and settings, tokens, auth roles, policies) in F, written atomically after every change and read at start;
--ports P1,P2 binds the API listeners to those ports instead of free ones; --sealed starts every listener sealed
(unseal with the control request {"all": true, "sealed": false}).

Usage: vault_test_server.py --ready-file F [--listeners N] [--ports P1,...] [--tls-cert C --tls-key K
                            [--client-ca CA]] [--root-token T] [--namespaces ns1,ns2] [--state-file F] [--sealed]
"""

import argparse
import base64
import binascii
import json
import os
import secrets
import socket
import ssl
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from socketserver import ThreadingMixIn

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

LOCK = threading.RLock()


class UserError(Exception):
    def __init__(self, status, errors):
        super().__init__(errors)
        self.status = status
        self.errors = errors


def now():
    return time.time()


class State:
    """Shared storage of the "cluster"."""

    def __init__(self, root_token, namespaces):
        self.keys = {}  # (ns, mount, name) -> key dict
        self.tokens = {}  # id -> dict
        self.mounts = {"transit"}
        self.namespaces = {""} | set(namespaces)
        self.approles = {}  # mount -> (role_id, secret_id)
        self.jwt_roles = {}  # (mount, role) -> jwt
        self.cert_roles = set()  # (mount, name)
        self.policies = {}  # name -> {path: set(capabilities)}
        self.token_ttl = 3600
        self.token_max_ttl = 86400
        self.root_token = root_token
        self.dirty = False  # storage changed since it was last written to --state-file
        if root_token:
            self.tokens[root_token] = {"ttl": 0, "renewable": False, "expire": None, "max_expire": None,
                                       "policies": ["root"], "creation_ttl": 0, "issue": now()}

    def issue_token(self, ttl=None, max_ttl=None, renewable=True, policies=None, token_id=None):
        ttl = self.token_ttl if ttl is None else ttl
        max_ttl = self.token_max_ttl if max_ttl is None else max_ttl
        tid = token_id or ("hvs." + secrets.token_urlsafe(24))
        t = now()
        self.tokens[tid] = {"ttl": ttl, "renewable": renewable, "expire": t + ttl if ttl else None,
                            "max_expire": t + max_ttl if max_ttl else None, "policies": policies or ["default", "kms"],
                            "creation_ttl": ttl, "issue": t, "accessor": secrets.token_hex(12)}
        self.dirty = True
        return tid

    def valid_token(self, tid):
        tok = self.tokens.get(tid)
        if tok is None:
            return None
        if tok["expire"] is not None and now() >= tok["expire"]:
            del self.tokens[tid]
            return None
        return tok

    def create_key(self, ns, mount, name, created=None):
        self.keys[(ns, mount, name)] = {
            "versions": {1: (AESGCM.generate_key(256), int(created or now()))},
            "latest": 1, "min_decryption": 1, "min_encryption": 0, "min_available": 0,
        }
        self.dirty = True

    # Storage as JSON (key material base64: this is a test server's throw-away storage, written 0600).
    def save(self, path):
        keys = [{"ns": ns, "mount": m, "name": n, "latest": k["latest"], "min_decryption": k["min_decryption"],
                 "min_encryption": k["min_encryption"], "min_available": k["min_available"],
                 "versions": {str(v): [base64.b64encode(raw).decode(), created]
                              for v, (raw, created) in k["versions"].items()}}
                for (ns, m, n), k in self.keys.items()]
        doc = {"keys": keys, "tokens": self.tokens, "mounts": sorted(self.mounts),
               "approles": {m: list(v) for m, v in self.approles.items()},
               "jwt_roles": [[m, r, j] for (m, r), j in self.jwt_roles.items()],
               "cert_roles": [list(c) for c in self.cert_roles],
               "policies": {n: {p: sorted(c) for p, c in pol.items()} for n, pol in self.policies.items()},
               "token_ttl": self.token_ttl, "token_max_ttl": self.token_max_ttl}
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        self.dirty = False

    def load(self, path):
        with open(path) as f:
            doc = json.load(f)
        for k in doc["keys"]:
            self.keys[(k["ns"], k["mount"], k["name"])] = {
                "versions": {int(v): (base64.b64decode(raw), created) for v, (raw, created) in k["versions"].items()},
                "latest": k["latest"], "min_decryption": k["min_decryption"], "min_encryption": k["min_encryption"],
                "min_available": k["min_available"]}
        self.tokens.update(doc["tokens"])
        self.mounts = set(doc["mounts"])
        self.approles = {m: tuple(v) for m, v in doc["approles"].items()}
        self.jwt_roles = {(m, r): j for m, r, j in doc["jwt_roles"]}
        self.cert_roles = {tuple(c) for c in doc["cert_roles"]}
        self.policies = {n: {p: set(c) for p, c in pol.items()} for n, pol in doc["policies"].items()}
        self.token_ttl = doc["token_ttl"]
        self.token_max_ttl = doc["token_max_ttl"]


class Listener:
    def __init__(self):
        self.sealed = False
        self.standby_redirect = ""
        self.fail_status = 0
        self.fail_count = 0
        self.fail_path = ""
        self.rate_limit_count = 0
        self.retry_after = None
        self.delay = 0.0
        self.hang = threading.Event()  # set = hanging
        self.unhang = threading.Event()
        self.connections = 0
        self.requests = {}
        self.server = None
        self.port = 0
        self.scheme = "http"
        self.open_sockets = set()


def key_data(name, k):
    # Vault lists only the working set: versions below min_decryption_version are moved to the policy's archive and
    # deleted from p.Keys (sdk/helper/keysutil/policy.go handleArchiving: `for i := p.LatestVersion - len(p.Keys) + 1;
    # i < p.MinDecryptionVersion; i++ { delete(p.Keys, ...) }`), and formatKeyPolicy (builtin/logical/transit/
    # path_keys.go) builds "keys" from p.Keys. Lowering min_decryption_version moves them back from the archive.
    return {
        "name": name, "type": "aes256-gcm96",
        "keys": {str(v): created for v, (_, created) in sorted(k["versions"].items()) if v >= k["min_decryption"]},
        "latest_version": k["latest"], "min_available_version": k["min_available"],
        "min_decryption_version": k["min_decryption"], "min_encryption_version": k["min_encryption"],
        "deletion_allowed": False, "derived": False, "exportable": False, "allow_plaintext_backup": False,
        "auto_rotate_period": 0, "supports_encryption": True, "supports_decryption": True,
        "supports_derivation": True, "supports_signing": False, "imported_key": False,
    }


def envelope(data=None, auth=None, warnings=None):
    return {"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False, "lease_duration": 0,
            "data": data, "wrap_info": None, "warnings": warnings, "auth": auth}


def b64decode_field(body, field, required):
    value = body.get(field)
    if value is None or value == "":
        if required:
            raise UserError(400, ["missing " + field])
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise UserError(400, ["failed to base64-decode " + field])


def to_int(value, name):
    if value is None or value == "":
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(400, ["error converting input for field %s" % name])


class Api:
    def __init__(self, state, args):
        self.state = state
        self.args = args

    def auth_response(self, tid):
        tok = self.state.tokens[tid]
        return envelope(auth={
            "client_token": tid, "accessor": tok.get("accessor", ""), "policies": tok["policies"],
            "token_policies": tok["policies"], "metadata": {}, "lease_duration": int(tok["ttl"]),
            "renewable": tok["renewable"], "entity_id": "", "token_type": "service", "orphan": True, "num_uses": 0})

    def handle(self, handler, method, path, body):
        st = self.state
        if path == "sys/health":
            return None  # handled by the caller
        ns = handler.headers.get("X-Vault-Namespace", "").strip("/")
        if ns not in st.namespaces:
            raise UserError(404, ["no handler for route \"%s/%s\". route entry not found." % (ns, path)])
        parts = path.split("/")
        # Logins need no token.
        if len(parts) == 3 and parts[0] == "auth" and parts[2] == "login" and method in ("POST", "PUT"):
            return self.login(handler, parts[1], body)
        tid = handler.headers.get("X-Vault-Token", "")
        if not tid and handler.headers.get("Authorization", "").startswith("Bearer "):
            tid = handler.headers["Authorization"][len("Bearer "):]
        tok = st.valid_token(tid) if tid else None
        if tok is None:
            if tid:
                raise UserError(403, ["2 errors occurred:\n\t* permission denied\n\t* invalid token\n\n"])
            raise UserError(403, ["permission denied"])
        self.check_acl(tok, method, path, ns)
        if path == "auth/token/lookup-self" and method == "GET":
            ttl = 0 if tok["expire"] is None else max(0, int(tok["expire"] - now()))
            return 200, envelope(data={"id": tid, "accessor": tok.get("accessor", ""), "ttl": ttl,
                                       "creation_ttl": tok["creation_ttl"], "renewable": tok["renewable"],
                                       "policies": tok["policies"], "num_uses": 0, "orphan": True,
                                       "path": "auth/token/create", "meta": None,
                                       "expire_time": None, "explicit_max_ttl": 0,
                                       "issue_time": None, "creation_time": int(tok["issue"])})
        if path == "auth/token/renew-self" and method in ("POST", "PUT"):
            if not tok["renewable"]:
                raise UserError(400, ["lease is not renewable"])
            inc = body.get("increment")
            if isinstance(inc, str):
                inc = int(inc.rstrip("s")) if inc.rstrip("s").isdigit() else None
            ttl = inc or tok["creation_ttl"]
            expire = now() + ttl
            if tok["max_expire"] is not None:
                expire = min(expire, tok["max_expire"])
            tok["expire"] = expire
            tok["ttl"] = max(0, int(round(expire - now())))
            st.dirty = True
            return 200, self.auth_response(tid)
        if len(parts) < 3 or parts[0] not in st.mounts:
            raise UserError(404, ["no handler for route \"%s\". route entry not found." % path])
        mount, op = parts[0], parts[1]
        name = parts[2]
        key = st.keys.get((ns, mount, name))
        if op == "keys":
            if len(parts) == 3 and method == "GET":
                if key is None:
                    raise UserError(404, [])
                return 200, envelope(data=key_data(name, key))
            if len(parts) == 3 and method in ("POST", "PUT"):
                if key is not None:
                    return 200, envelope(data=key_data(name, key), warnings=["key %s already existed" % name])
                if body.get("type", "aes256-gcm96") != "aes256-gcm96":
                    raise UserError(400, ["this test server only supports aes256-gcm96"])
                st.create_key(ns, mount, name)
                return 200, envelope(data=key_data(name, st.keys[(ns, mount, name)]))
            if len(parts) == 4 and parts[3] == "rotate" and method in ("POST", "PUT"):
                if key is None:
                    raise UserError(400, ["key not found"])
                key["latest"] += 1
                key["versions"][key["latest"]] = (AESGCM.generate_key(256), int(now()))
                st.dirty = True
                return 200, envelope(data=key_data(name, key))
            if len(parts) == 4 and parts[3] == "config" and method in ("POST", "PUT"):
                if key is None:
                    raise UserError(400, ["no existing key named %s could be found" % name])
                mdv = to_int(body.get("min_decryption_version"), "min_decryption_version")
                mev = to_int(body.get("min_encryption_version"), "min_encryption_version")
                new_mdv, new_mev = key["min_decryption"], key["min_encryption"]
                if mdv:
                    if mdv > key["latest"]:
                        raise UserError(400, ["cannot set min decryption version of %d, latest key version is %d"
                                              % (mdv, key["latest"])])
                    new_mdv = mdv
                if "min_encryption_version" in body:
                    new_mev = mev
                # The rule holds for the resulting pair, whichever field the request changed
                # (backends.md: min_encryption_version is 0 or >= min_decryption_version).
                if new_mev and new_mev < new_mdv:
                    raise UserError(400, ["minimum decryption version is greater than minimum encryption "
                                          "version"])
                key["min_decryption"], key["min_encryption"] = new_mdv, new_mev
                st.dirty = True
                return 200, envelope(data=key_data(name, key))
            raise UserError(405, ["unsupported operation"])
        if op == "encrypt" and len(parts) == 3 and method in ("POST", "PUT"):
            if key is None:
                raise UserError(400, ["encryption key not found"])
            if "batch_input" in body:
                raise UserError(400, ["batch_input is not supported by this test server"])
            if body.get("plaintext") is None:
                raise UserError(400, ["missing plaintext to encrypt"])
            plaintext = b64decode_field(body, "plaintext", False) or b""
            aad = b64decode_field(body, "associated_data", False)
            ver = to_int(body.get("key_version"), "key_version")
            if ver == 0:
                ver = key["latest"]
            if ver > key["latest"]:
                raise UserError(400, ["requested version for encryption is higher than the latest key version"])
            if key["min_encryption"] and ver < key["min_encryption"]:
                raise UserError(400, ["requested version for encryption is less than the minimum encryption key "
                                      "version"])
            raw, _ = key["versions"][ver]
            nonce = os.urandom(12)
            ct = AESGCM(raw).encrypt(nonce, plaintext, aad)
            return 200, envelope(data={"ciphertext": "vault:v%d:%s" % (ver, base64.b64encode(nonce + ct).decode()),
                                       "key_version": ver})
        if op == "decrypt" and len(parts) == 3 and method in ("POST", "PUT"):
            if key is None:
                raise UserError(400, ["encryption key not found"])
            ctext = body.get("ciphertext")
            if not isinstance(ctext, str) or not ctext:
                raise UserError(400, ["missing ciphertext to decrypt"])
            aad = b64decode_field(body, "associated_data", False)
            if not ctext.startswith("vault:v"):
                raise UserError(400, ["invalid ciphertext: no prefix"])
            rest = ctext[len("vault:v"):]
            if ":" not in rest:
                raise UserError(400, ["invalid ciphertext: wrong number of fields"])
            vstr, b64 = rest.split(":", 1)
            try:
                ver = int(vstr)
            except ValueError:
                raise UserError(400, ["invalid ciphertext: version number could not be decoded"])
            if ver == 0:
                ver = 1
            if ver > key["latest"]:
                raise UserError(400, ["invalid ciphertext: version is too new"])
            if ver < key["min_decryption"]:
                raise UserError(400, ["ciphertext or signature version is disallowed by policy (too old)"])
            try:
                blob = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise UserError(400, ["invalid ciphertext: could not decode base64"])
            if ver not in key["versions"]:
                raise UserError(400, ["invalid ciphertext: version is too old (trimmed)"])
            raw, _ = key["versions"][ver]
            try:
                pt = AESGCM(raw).decrypt(blob[:12], blob[12:], aad)
            except Exception:
                raise UserError(400, ["cipher: message authentication failed"])
            return 200, envelope(data={"plaintext": base64.b64encode(pt).decode()})
        raise UserError(404, ["no handler for route \"%s\". route entry not found." % path])

    def check_acl(self, tok, method, path, ns):
        st = self.state
        if "root" in tok["policies"]:
            return
        defined = [st.policies[p] for p in tok["policies"] if p in st.policies]
        if not defined:
            return  # no policy of this token is modelled: everything is allowed, as before policies existed
        # Vault's built-in "default" policy grants these to every token that has it.
        if "default" in tok["policies"] and path in ("auth/token/lookup-self", "auth/token/renew-self"):
            return
        if method == "GET":
            need = "read"
        elif method in ("POST", "PUT"):
            need = "update"
            parts = path.split("/")
            if len(parts) == 3 and parts[1] == "keys" and (ns, parts[0], parts[2]) not in st.keys:
                need = "create"
        elif method == "DELETE":
            need = "delete"
        else:
            need = "list"
        for pol in defined:
            for pattern, caps in pol.items():
                match = path.startswith(pattern[:-1]) if pattern.endswith("*") else path == pattern
                if match and need in caps:
                    return
        raise UserError(403, ["1 error occurred:\n\t* permission denied\n\n"])

    def login(self, handler, mount, body):
        st = self.state
        if mount in st.approles:
            role_id, secret_id = st.approles[mount]
            if not body.get("role_id"):
                raise UserError(400, ["missing role_id"])
            if not body.get("secret_id"):
                raise UserError(400, ["missing secret_id"])
            if body["role_id"] != role_id or body["secret_id"] != secret_id:
                raise UserError(400, ["invalid role or secret ID"])
            return 200, self.auth_response(st.issue_token())
        if any(m == mount for (m, _) in st.jwt_roles):
            role = body.get("role", "")
            if (mount, role) not in st.jwt_roles:
                raise UserError(400, ["invalid role name \"%s\"" % role])
            if body.get("jwt") != st.jwt_roles[(mount, role)]:
                raise UserError(403, ["permission denied"])
            return 200, self.auth_response(st.issue_token())
        if any(m == mount for (m, _) in st.cert_roles):
            name = body.get("name", "")
            cert = None
            try:
                cert = handler.connection.getpeercert()
            except Exception:
                cert = None
            if not cert:
                raise UserError(400, ["client certificate must be supplied"])
            if (mount, name) not in st.cert_roles:
                raise UserError(400, ["invalid certificate or no client certificate supplied"])
            return 200, self.auth_response(st.issue_token())
        raise UserError(404, ["no handler for route \"auth/%s/login\". route entry not found." % mount])


def persist(state, args):
    if args.state_file and state.dirty:
        state.save(args.state_file)


def make_handler(api, listener, args):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; with Nagle on, the body waits for the client's delayed ACK of the
        # headers (~40 ms per keep-alive request), which real Vault (Go, TCP_NODELAY) never does.
        disable_nagle_algorithm = True

        def log_message(self, fmt, *a):
            if args.verbose:
                sys.stderr.write("[%d] %s\n" % (listener.port, fmt % a))

        def send_json(self, status, obj, extra_headers=None):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra_headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_any(self, method):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            path = self.path.split("?", 1)[0]
            with LOCK:
                listener.requests[path] = listener.requests.get(path, 0) + 1
            if listener.hang.is_set():
                listener.unhang.wait(120)
                self.close_connection = True
                return
            if listener.delay:
                time.sleep(listener.delay)
            if not path.startswith("/v1/"):
                return self.send_json(404, {"errors": []})
            vpath = path[len("/v1/"):].strip("/")
            with LOCK:
                if vpath == "sys/health":
                    return self.health()
                if listener.sealed:
                    return self.send_json(503, {"errors": ["Vault is sealed"]})
                if listener.standby_redirect:
                    loc = listener.standby_redirect + path
                    self.send_response(307)
                    self.send_header("Location", loc)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if listener.rate_limit_count > 0:
                    listener.rate_limit_count -= 1
                    hdrs = {}
                    if listener.retry_after is not None:
                        hdrs["Retry-After"] = str(listener.retry_after)
                    return self.send_json(429, {"errors": ["request path \"%s\": rate limit quota exceeded" % vpath]},
                                          hdrs)
                if listener.fail_count > 0 and listener.fail_path in path:
                    listener.fail_count -= 1
                    return self.send_json(listener.fail_status or 500, {"errors": ["injected failure"]})
                try:
                    body = json.loads(raw) if raw.strip() else {}
                    if not isinstance(body, dict):
                        raise ValueError()
                except ValueError:
                    return self.send_json(400, {"errors": ["failed to parse JSON input: invalid character"]})
                try:
                    status, obj = api.handle(self, method, vpath, body)
                except UserError as e:
                    return self.send_json(e.status, {"errors": e.errors})
                finally:
                    persist(api.state, args)  # written before the answer, as Vault's storage is
                return self.send_json(status, obj)

        def health(self):
            body = {"initialized": True, "sealed": listener.sealed, "standby": bool(listener.standby_redirect),
                    "performance_standby": False, "replication_performance_mode": "disabled",
                    "replication_dr_mode": "disabled", "server_time_utc": int(now()), "version": "1.17.3-test",
                    "cluster_name": "vault-test", "cluster_id": "00000000-test"}
            status = 503 if listener.sealed else (429 if listener.standby_redirect else 200)
            return self.send_json(status, body)

        def do_GET(self):
            self.do_any("GET")

        def do_POST(self):
            self.do_any("POST")

        def do_PUT(self):
            self.do_any("PUT")

        def do_DELETE(self):
            self.do_any("DELETE")

        def do_HEAD(self):
            self.do_any("HEAD")

    return Handler


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, listener, handler, ssl_ctx, port=0):
        self.listener = listener
        self.ssl_ctx = ssl_ctx
        super().__init__(("127.0.0.1", port), handler)

    def process_request(self, request, client_address):
        with LOCK:
            self.listener.connections += 1
            self.listener.open_sockets.add(request)
        super().process_request(request, client_address)

    def finish_request(self, request, client_address):
        if self.ssl_ctx is not None:
            request.settimeout(30)
            try:
                request = self.ssl_ctx.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as e:
                if self.listener and getattr(sys.modules[__name__], "VERBOSE", False):
                    sys.stderr.write("TLS handshake failed: %s\n" % e)
                return
            request.settimeout(None)
            with LOCK:
                self.listener.open_sockets.add(request)
        try:
            super().finish_request(request, client_address)
        finally:
            with LOCK:
                self.listener.open_sockets.discard(request)

    def shutdown_request(self, request):
        with LOCK:
            self.listener.open_sockets.discard(request)
        super().shutdown_request(request)


def make_control(state, listeners, args):
    class Control(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            pass

        def reply(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            with LOCK:
                self.reply(200, {"listeners": [{"port": l.port, "connections": l.connections,
                                                "requests": dict(l.requests)} for l in listeners]})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            try:
                c = json.loads(self.rfile.read(length) or b"{}")
                with LOCK:
                    self.apply(c)
                    state.dirty = True
                    persist(state, args)
            except Exception as e:  # report the bad control request to the test
                return self.reply(400, {"error": repr(e)})
            self.reply(200, {"ok": True})

        def apply(self, c):
            targets = listeners if c.get("all") else [listeners[int(c.get("listener", 0))]]
            for l in targets:
                if "sealed" in c:
                    l.sealed = bool(c["sealed"])
                if "standby_redirect" in c:
                    l.standby_redirect = c["standby_redirect"]
                if "fail_count" in c:
                    l.fail_count = int(c["fail_count"])
                    l.fail_status = int(c.get("fail_status", 500))
                    l.fail_path = c.get("fail_path", "")
                if "rate_limit_count" in c:
                    l.rate_limit_count = int(c["rate_limit_count"])
                    l.retry_after = c.get("retry_after")
                if "delay" in c:
                    l.delay = float(c["delay"])
                if "hang" in c:
                    if c["hang"]:
                        l.unhang.clear()
                        l.hang.set()
                    else:
                        l.hang.clear()
                        l.unhang.set()
                if c.get("close"):
                    l.server.shutdown()
                    l.server.server_close()
                    for s in list(l.open_sockets):
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                if c.get("reset_stats"):
                    l.connections = 0
                    l.requests = {}
            if c.get("revoke_tokens"):
                for tid in list(state.tokens):
                    if tid != state.root_token:
                        del state.tokens[tid]
            if "add_token" in c:
                t = c["add_token"]
                state.issue_token(ttl=t.get("ttl"), max_ttl=t.get("max_ttl"), renewable=t.get("renewable", True),
                                  policies=t.get("policies"), token_id=t["id"])
            if "set_token_ttl" in c:
                t = c["set_token_ttl"]
                tok = state.tokens[t["id"]]
                ttl = float(t["ttl"])
                tok["expire"] = now() + ttl if ttl > 0 else now() - 1
                tok["ttl"] = max(0, int(ttl))
            if "policy" in c:
                pol = c["policy"]
                state.policies[pol["name"]] = {path: set(caps) for path, caps in pol["paths"].items()}
            if "approle" in c:
                a = c["approle"]
                state.approles[a.get("mount", "approle")] = (a["role_id"], a["secret_id"])
            if "jwt_role" in c:
                j = c["jwt_role"]
                state.jwt_roles[(j.get("mount", "kubernetes"), j["role"])] = j["jwt"]
            if "cert_role" in c:
                r = c["cert_role"]
                state.cert_roles.add((r.get("mount", "cert"), r["name"]))
            if "token_ttl" in c:
                state.token_ttl = int(c["token_ttl"])
            if "token_max_ttl" in c:
                state.token_max_ttl = int(c["token_max_ttl"])
            if "mount" in c:
                state.mounts.add(c["mount"])
            for op in ("create_key", "delete_key", "key_config"):
                if op in c:
                    k = c[op]
                    ident = (k.get("namespace", ""), k.get("mount", "transit"), k["name"])
                    if op == "create_key":
                        state.create_key(*ident, created=k.get("created"))
                    elif op == "delete_key":
                        state.keys.pop(ident, None)
                    else:
                        key = state.keys[ident]
                        if "min_decryption_version" in k:
                            key["min_decryption"] = int(k["min_decryption_version"])
                        if "min_encryption_version" in k:
                            key["min_encryption"] = int(k["min_encryption_version"])

    return Control


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ready-file", required=True)
    p.add_argument("--listeners", type=int, default=1)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--client-ca")
    p.add_argument("--root-token", default="")
    p.add_argument("--namespaces", default="")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--ports", default="", help="API ports, one per listener (default: free ports)")
    p.add_argument("--state-file", default="", help="keep the storage in this file across restarts")
    p.add_argument("--sealed", action="store_true", help="start sealed, as a restarted Vault does")
    args = p.parse_args()
    ports = [int(x) for x in args.ports.split(",") if x]
    if ports and len(ports) != args.listeners:
        p.error("--ports needs one port per listener")

    state = State(args.root_token, [n.strip("/") for n in args.namespaces.split(",") if n])
    if args.state_file and os.path.exists(args.state_file):
        state.load(args.state_file)
    api = Api(state, args)
    ssl_ctx = None
    if args.tls_cert:
        ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ssl_ctx.load_cert_chain(args.tls_cert, args.tls_key)
        if args.client_ca:
            ssl_ctx.load_verify_locations(args.client_ca)
            ssl_ctx.verify_mode = ssl.CERT_OPTIONAL

    listeners = []
    for i in range(args.listeners):
        l = Listener()
        l.sealed = args.sealed
        l.scheme = "https" if ssl_ctx else "http"
        for attempt in range(50):  # a port given back by a killed server may take a moment to be free again
            try:
                l.server = ApiServer(l, make_handler(api, l, args), ssl_ctx, ports[i] if ports else 0)
                break
            except OSError:
                if not ports or attempt == 49:
                    raise
                time.sleep(0.1)
        l.port = l.server.server_address[1]
        listeners.append(l)
        threading.Thread(target=l.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    control = ThreadingHTTPServer(("127.0.0.1", 0), make_control(state, listeners, args))
    control.daemon_threads = True
    threading.Thread(target=control.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"api": [l.port for l in listeners], "control": control.server_address[1]}, f)
    os.rename(tmp, args.ready_file)
    try:
        # Exit when the parent (the test) closes our stdin or goes away.
        while True:
            if sys.stdin.read(1) == "":
                break
    except KeyboardInterrupt:
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
