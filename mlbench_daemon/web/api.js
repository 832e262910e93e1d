// Requests to the daemon's API: a timeout on every request, the bearer token from
// sessionStorage (asked for in a dialog on the first 401, never put in a URL, never
// a cookie), and one error type carrying the daemon's JSON error.

const TOKEN_KEY = "mlbench-daemon-token";

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = (body && body.error) || "http-error";
  }
  // A failure of the connection or of the daemon (retry with backoff), not of the request.
  get transient() {
    return this.status === 0 || this.status >= 500;
  }
}

let asking = null; // the pending token dialog, shared by every request that met a 401

function askToken(message) {
  if (!asking) {
    asking = new Promise((resolve) => {
      const dialog = document.getElementById("token-dialog");
      const form = document.getElementById("token-form");
      const input = document.getElementById("token-input");
      document.getElementById("token-why").textContent = message;
      input.value = "";
      form.onsubmit = (ev) => {
        ev.preventDefault();
        const token = input.value.trim();
        if (!token) return;
        sessionStorage.setItem(TOKEN_KEY, token);
        input.value = "";
        dialog.close();
        asking = null;
        window.dispatchEvent(new Event("mlbench-token")); // another token: who am I now
        resolve();
      };
      dialog.oncancel = (ev) => ev.preventDefault(); // no data without a token: keep asking
      dialog.showModal();
    });
  }
  return asking;
}

function timeoutSignal(ms, outer) {
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(new DOMException("timed out", "TimeoutError")), ms);
  const onAbort = () => ctrl.abort(outer.reason);
  if (outer) {
    if (outer.aborted) ctrl.abort(outer.reason);
    else outer.addEventListener("abort", onAbort, { once: true });
  }
  const done = () => {
    clearTimeout(timer);
    if (outer) outer.removeEventListener("abort", onAbort);
  };
  return { signal: ctrl.signal, done };
}

// fetch() with the token and a timeout.  `read(response)` runs under the same timeout
// (a streamed body is read by the caller under its own signal instead: no `read`).
// Returns read's result, or the Response of a 2xx; throws ApiError otherwise (status 0:
// no answer).  On a 401 the stored token is dropped and the dialog asks for one; the
// request then goes again.
export async function request(path, { method = "GET", body, timeout = 10000, signal, read } = {}) {
  for (;;) {
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    let payload;
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    const t = timeoutSignal(timeout, signal);
    let response, result;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: payload,
        signal: t.signal,
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
      });
      if (response.ok && read) result = await read(response);
    } catch (e) {
      if (signal && signal.aborted) throw e; // the caller left: not a connection problem
      const timedOut = t.signal.reason?.name === "TimeoutError";
      const err = new ApiError(0, {
        message: timedOut
          ? `no answer within ${Math.round(timeout / 1000)} s`
          : "no connection to the daemon",
      });
      err.timedOut = timedOut;
      throw err;
    } finally {
      t.done();
    }
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      await askToken(
        token
          ? "That token was refused. Enter the daemon's API token."
          : "The daemon asks for its API token (server.token_file). It is kept in this tab only.",
      );
      if (signal && signal.aborted) throw signal.reason;
      continue;
    }
    if (!response.ok) {
      let detail = null;
      try {
        detail = await response.json();
      } catch {
        /* not JSON: a proxy in between */
      }
      throw new ApiError(response.status, detail);
    }
    return read ? result : response;
  }
}

export function getJSON(path, opts = {}) {
  return request(path, { ...opts, read: (r) => r.json() });
}
