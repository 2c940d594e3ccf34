// The dashboard's only way to the server: the same `/v1` API the CLI uses,
// every request with the bearer key, same origin only. The key lives in
// this tab's sessionStorage and nowhere else (no cookie, no URL).

const KEY = 'hyperfuncd.key';

export const session = {
  get key() {
    return sessionStorage.getItem(KEY);
  },
  set(key) {
    sessionStorage.setItem(KEY, key);
  },
  clear() {
    sessionStorage.removeItem(KEY);
  },
};

/** An answer other than 2xx, as the API said it. */
export class ApiError extends Error {
  constructor(status, code, message, body) {
    super(message);
    this.status = status;
    this.code = code;
    this.body = body;
  }

  /** `401 unauthorized: missing or unknown API key` */
  toString() {
    return `${this.status} ${this.code}: ${this.message}`;
  }
}

/** The ApiError of a failed response, from its JSON `error` or its text. */
export async function errorOf(r) {
  const text = await r.text();
  try {
    const v = JSON.parse(text);
    if (v && v.error) {
      return new ApiError(r.status, v.error.code, v.error.message, v);
    }
  } catch {
    // Not JSON: show the text as it came.
  }
  return new ApiError(r.status, `http_${r.status}`, text || r.statusText, null);
}

/**
 * One request. `key` overrides the session's (sign-in tries a key before
 * keeping it). Returns the Response when `raw`, else the JSON (null on 204).
 */
export async function api(method, path, opts = {}) {
  const key = opts.key ?? session.key;
  if (!key) {
    throw new ApiError(401, 'unauthorized', 'not signed in', null);
  }
  const headers = { Authorization: `Bearer ${key}` };
  let body = opts.body;
  if (opts.json !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(opts.json);
  }
  const r = await fetch(path, {
    method,
    headers,
    body,
    signal: opts.signal,
    cache: 'no-store',
    credentials: 'omit',
    redirect: 'error',
  });
  if (opts.raw) {
    return r;
  }
  if (!r.ok) {
    throw await errorOf(r);
  }
  return r.status === 204 ? null : r.json();
}

/**
 * `/v1/functions/NAME` + `rest`, the name encoded; with `owner`, the
 * function of that user (names are per user; only an admin may name
 * another's).
 */
export function fnPath(name, rest = '', owner = null) {
  const path = `/v1/functions/${encodeURIComponent(name)}${rest}`;
  if (!owner) {
    return path;
  }
  return `${path}${rest.includes('?') ? '&' : '?'}owner=${encodeURIComponent(owner)}`;
}

/** Calls `onEvent` for each JSON line of a (possibly endless) NDJSON answer. */
export async function streamLines(path, onEvent, signal) {
  const r = await api('GET', path, { raw: true, signal });
  if (!r.ok) {
    throw await errorOf(r);
  }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) {
      return;
    }
    buf += value;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (line) {
        onEvent(JSON.parse(line));
      }
    }
  }
}

/**
 * Reads server-sent events (`event:`/`data:` lines, a blank line after
 * each), calling `onEvent(name, JSON of data)`; resolves when the server
 * ends the stream. fetch rather than EventSource, which cannot send the
 * bearer key.
 */
export async function streamEvents(path, onEvent, signal) {
  const r = await api('GET', path, { raw: true, signal });
  if (!r.ok) {
    throw await errorOf(r);
  }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) {
      return;
    }
    buf += value;
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const frame = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let name = 'message';
      const data = [];
      for (const line of frame.split('\n')) {
        if (line.startsWith('event:')) {
          name = line.slice(6).trim();
        } else if (line.startsWith('data:')) {
          data.push(line.slice(5).trimStart());
        }
      }
      if (data.length) {
        onEvent(name, JSON.parse(data.join('\n')));
      }
    }
  }
}

/**
 * Waits for a call's output: long-polls `/v1/calls/ID/output?wait` while
 * the call is pending (202) or running (201), reporting the state. Resolves
 * with the bytes; a failed call rejects with the API's reason.
 */
export async function waitOutput(callId, onState, signal) {
  const path = `/v1/calls/${encodeURIComponent(callId)}/output?wait=60`;
  for (;;) {
    const r = await api('GET', path, { raw: true, signal });
    if (r.status === 200) {
      return new Uint8Array(await r.arrayBuffer());
    }
    if (r.status === 201 || r.status === 202) {
      const v = await r.json().catch(() => ({}));
      onState(v.State ?? (r.status === 201 ? 'RUNNING' : 'PENDING'));
      continue;
    }
    throw await errorOf(r);
  }
}

/** Splits a command line as a shell would for words and quotes (no expansion). */
export function splitCommand(text) {
  const words = [];
  let word = null;
  let quote = null;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quote) {
      if (c === quote) {
        quote = null;
      } else if (c === '\\' && quote === '"' && i + 1 < text.length) {
        word += text[++i];
      } else {
        word += c;
      }
    } else if (c === '"' || c === "'") {
      quote = c;
      word ??= '';
    } else if (c === '\\' && i + 1 < text.length) {
      word = (word ?? '') + text[++i];
    } else if (/\s/.test(c)) {
      if (word !== null) {
        words.push(word);
        word = null;
      }
    } else {
      word = (word ?? '') + c;
    }
  }
  if (quote) {
    throw new ApiError(0, 'bad_command', `unclosed ${quote} in the command`, null);
  }
  if (word !== null) {
    words.push(word);
  }
  return words;
}

/** The command as one line that `splitCommand` reads back. */
export function joinCommand(words) {
  return words
    .map((w) => (w !== '' && /^[\w@%+=:,./-]+$/.test(w) ? w : `'${w.replaceAll("'", "'\\''")}'`))
    .join(' ');
}

/** `K=V` lines, blank lines dropped. */
export function envLines(text) {
  return text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '');
}

/** 1536 → "1.5 KiB". */
export function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = Number(n);
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${v} B` : `${v.toFixed(1)} ${units[u]}`;
}
