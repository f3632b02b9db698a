// REST calls to the server that serves this page. Paths are relative to the page, so the UI also works behind a
// reverse proxy that serves it under a prefix. Errors carry the server's `detail` text.
import { authHeaders } from './auth.js';

export class ApiError extends Error {
  constructor(status, detail, retryAfter = null) {
    super(detail);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

export function serverUrl(path) {
  return new URL(path, document.baseURI);
}

export class Api {
  /** `onAuthRequired(detail)` is called on every 401, so the page can ask for a key. */
  constructor({ onAuthRequired = () => {} } = {}) {
    this.onAuthRequired = onAuthRequired;
  }

  async request(path, { method = 'GET', body } = {}) {
    const headers = { Accept: 'application/json', ...authHeaders() };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let response;
    try {
      response = await fetch(serverUrl(path), {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch {
      throw new ApiError(0, 'The server cannot be reached. Check that it is running.');
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const detail =
        data && typeof data.detail === 'string' ? data.detail : `${response.status} ${response.statusText}`;
      if (response.status === 401) this.onAuthRequired(detail);
      throw new ApiError(response.status, detail, response.headers.get('Retry-After'));
    }
    return data;
  }

  models() {
    return this.request('api/v2/models');
  }

  /** What each metric is (names, labels, direction, meaning): the server's metric table. */
  metricLegend() {
    return this.request('api/v1/metrics/legend');
  }

  health() {
    return this.request('health');
  }

  status(requestId) {
    return this.request(`status/${encodeURIComponent(requestId)}`);
  }

  analyze(body) {
    return this.request('analyze', { method: 'POST', body });
  }

  /** Activations of a text (or messages) at the model's layer (`POST /api/v1/extract`). */
  extract(body) {
    return this.request('api/v1/extract', { method: 'POST', body });
  }

  /** Explanations of given vectors, optionally steered (`POST /api/v1/describe`). */
  describe(body) {
    return this.request('api/v1/describe', { method: 'POST', body });
  }

  cancel(requestId) {
    return this.request(`cancel/${encodeURIComponent(requestId)}`, { method: 'POST' });
  }

  history({ offset = 0, limit = 20, kind = 'analyze' } = {}) {
    return this.request(`api/history?limit=${limit}&offset=${offset}&kind=${kind}`);
  }

  batches({ offset = 0, limit = 20 } = {}) {
    return this.request(`api/v1/batches?limit=${limit}&offset=${offset}`);
  }

  cancelBatch(batchId) {
    return this.request(`api/v1/batches/${encodeURIComponent(batchId)}/cancel`, { method: 'POST' });
  }

  /** A batch's results so far as JSONL text (one item per line). */
  async batchResults(batchId) {
    let response;
    try {
      response = await fetch(serverUrl(`api/v1/batches/${encodeURIComponent(batchId)}/results`), {
        headers: { Accept: 'application/x-ndjson', ...authHeaders() },
      });
    } catch {
      throw new ApiError(0, 'The server cannot be reached. Check that it is running.');
    }
    const text = await response.text();
    if (!response.ok) {
      let detail = `${response.status} ${response.statusText}`;
      try {
        detail = JSON.parse(text).detail || detail;
      } catch {
        // not JSON: the status line says enough
      }
      if (response.status === 401) this.onAuthRequired(detail);
      throw new ApiError(response.status, detail);
    }
    return text;
  }

  /** True when the server refuses us for want of a key (a WebSocket refused at the handshake says nothing). */
  async needsKey() {
    try {
      await this.models();
      return false;
    } catch (err) {
      return err instanceof ApiError && err.status === 401;
    }
  }
}
