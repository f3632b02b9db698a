// Analysis runs: the ones this page submitted, and results opened from history, a permalink or a file.
// Server messages are matched to runs by client_request_id (ours) or request_id (the server's); after a
// reconnect, unfinished runs are followed again with `subscribe`.
import { CONTROL, newId } from './ids.js';

const TERMINAL = new Set(['completed', 'failed', 'cancelled']);

export const isTerminal = (run) => TERMINAL.has(run.status);

export function inputLabel(input) {
  if (!input) return '';
  if (typeof input.text === 'string') return input.text;
  const messages = input.messages || [];
  return messages.length ? messages[messages.length - 1].content : '';
}

export function textOfRows(rows) {
  return rows.map((r) => r.token).join('');
}

export class Analyses {
  constructor({ store, socket, api, notify }) {
    this.store = store;
    this.socket = socket;
    this.api = api;
    this.notify = notify;
    this.runs = new Map();
    this.byRequest = new Map();
    store.set('runs', this.runs);
  }

  get(id) {
    return this.runs.get(id);
  }

  active() {
    return this.runs.get(this.store.get('activeRun')) || null;
  }

  activate(id) {
    this.store.set('activeRun', id);
  }

  add(fields) {
    const run = {
      id: newId('ui'),
      requestId: null,
      status: 'sending',
      input: null,
      label: '',
      modelId: null,
      options: {},
      progress: null,
      queuePosition: null,
      queueSize: null,
      result: null,
      error: null,
      createdAt: new Date().toISOString(),
      ...fields,
    };
    this.runs.set(run.id, run);
    if (run.requestId) this.byRequest.set(run.requestId, run);
    this.store.emit('runs', run);
    return run;
  }

  remove(id) {
    const run = this.runs.get(id);
    if (!run) return;
    this.runs.delete(id);
    if (run.requestId) this.byRequest.delete(run.requestId);
    if (this.store.get('activeRun') === id) {
      const rest = [...this.runs.keys()];
      this.activate(rest.length ? rest[rest.length - 1] : null);
    }
    this.store.emit('runs', null);
  }

  patch(run, fields) {
    if (isTerminal(run) && fields.status && fields.status !== run.status) return; // terminal is terminal
    Object.assign(run, fields);
    if (run.requestId) this.byRequest.set(run.requestId, run);
    this.store.emit('runs', run);
  }

  // -- actions ----------------------------------------------------------------------------------------------------
  async submit({ input, modelId, options }) {
    const run = this.add({ origin: 'live', input, label: inputLabel(input), modelId, options });
    this.activate(run.id);
    const body = { ...input, model_id: modelId || undefined, options, client_request_id: run.id };
    if (this.socket.send({ type: 'analyze', ...body })) {
      run.connection = this.socket.connections;
      return run;
    }
    try {
      const accepted = await this.api.analyze(body);
      this.patch(run, {
        requestId: accepted.request_id,
        status: 'queued',
        queuePosition: accepted.queue_position,
        queueSize: accepted.queue_size,
      });
    } catch (err) {
      this.patch(run, { status: 'failed', error: err.message });
    }
    return run;
  }

  async cancel(run) {
    if (!run || isTerminal(run)) return;
    const frame = { type: 'cancel_request', client_request_id: `${CONTROL}cancel:${run.id}` };
    if (run.requestId) frame.request_id = run.requestId;
    else frame.client_request_id = run.id; // not confirmed yet: the server finds it by our id
    if (this.socket.send(frame)) return;
    if (!run.requestId) {
      this.patch(run, { status: 'cancelled', error: 'Cancelled before the server confirmed it.' });
      return;
    }
    try {
      const body = await this.api.cancel(run.requestId);
      this.patch(run, { status: 'cancelled', error: body.message });
    } catch (err) {
      this.notify.error(`Could not cancel: ${err.message}`);
    }
  }

  /** Open a stored job by id (permalink, history): its result if finished, else follow it live. */
  async openJob(requestId) {
    const known = this.byRequest.get(requestId);
    if (known) {
      this.activate(known.id);
      return known;
    }
    const body = await this.api.status(requestId);
    if (body.kind && body.kind !== 'analyze') throw new Error(`${requestId} is a ${body.kind} request, not an analysis.`);
    const rows = body.result ? body.result.tokens : null;
    const run = this.add({
      origin: 'stored',
      requestId,
      status: body.status,
      label: rows ? textOfRows(rows) : requestId,
      modelId: body.model_id,
      createdAt: body.created_at,
      queuePosition: body.queue_position,
      progress: body.progress,
      result: body.result,
      error: body.error,
    });
    this.activate(run.id);
    if (!isTerminal(run)) this.follow(run);
    return run;
  }

  /** Show analyses from a file (no server involved). */
  openImported(analyses, filename) {
    let last = null;
    for (const a of analyses) {
      last = this.add({
        origin: 'imported',
        filename,
        requestId: null,
        status: 'completed',
        input: a.input || null,
        label: a.input ? inputLabel(a.input) : textOfRows(a.tokens),
        modelId: a.model_id || a.metadata?.model_id || null,
        createdAt: a.created_at || null,
        originalRequestId: a.request_id || null,
        result: { tokens: a.tokens, metadata: a.metadata || {} },
      });
    }
    if (last) this.activate(last.id);
  }

  follow(run) {
    if (run.requestId) {
      this.socket.send({ type: 'subscribe', request_id: run.requestId, client_request_id: `${CONTROL}sub:${run.id}` });
    }
  }

  /** A new connection: follow unfinished runs again; runs sent on a lost connection and never confirmed fail. */
  connected() {
    for (const run of this.runs.values()) {
      if (isTerminal(run)) continue;
      if (run.requestId) this.follow(run);
      else if (run.connection !== undefined && run.connection < this.socket.connections) {
        this.patch(run, {
          status: 'failed',
          error: 'The connection dropped before the server confirmed this analysis. Look for it in History.',
        });
      }
    }
  }

  // -- server messages --------------------------------------------------------------------------------------------
  /** Returns true when the message was about one of our runs. */
  handle(msg) {
    if (msg.type === 'queue_update') {
      this.queuePositions(msg.queue_positions || {});
      return false;
    }
    const crid = msg.client_request_id;
    if (typeof crid === 'string' && crid.startsWith(CONTROL)) return this.controlReply(msg, crid);
    const run = (crid && this.runs.get(crid)) || (msg.request_id && this.byRequest.get(msg.request_id));
    if (!run) return false;
    const requestId = msg.request_id || run.requestId;
    switch (msg.type) {
      case 'queued':
        this.patch(run, { requestId, status: 'queued', queuePosition: msg.queue_position, queueSize: msg.queue_size });
        return true;
      case 'processing':
        this.patch(run, { requestId, status: 'processing', queuePosition: null, progress: { ...msg, at: Date.now() } });
        return true;
      case 'result':
        this.patch(run, {
          requestId,
          status: 'completed',
          progress: null,
          result: { tokens: msg.tokens || [], metadata: msg.metadata || {} },
        });
        return true;
      case 'error':
        this.patch(run, { requestId, status: 'failed', error: msg.error || 'The server reported an error.' });
        return true;
      case 'request_cancelled':
        this.patch(run, { requestId, status: 'cancelled', error: msg.message || 'Cancelled' });
        return true;
      case 'status':
        // a finished job's own final message (result, error, ...) follows this one and ends the run
        if (!isTerminal(run) && !TERMINAL.has(msg.status)) {
          this.patch(run, {
            requestId,
            status: msg.status,
            queuePosition: msg.queue_position,
            progress: msg.progress ? { ...msg.progress, at: Date.now() } : run.progress,
          });
        }
        return true;
      default:
        return false;
    }
  }

  queuePositions(positions) {
    for (const run of this.runs.values()) {
      if (run.status !== 'queued' || !run.requestId) continue;
      const position = positions[run.requestId];
      if (position !== undefined && position !== run.queuePosition) this.patch(run, { queuePosition: position });
    }
  }

  controlReply(msg, crid) {
    if (msg.type !== 'error') return true;
    const [action, ...rest] = crid.slice(CONTROL.length).split(':');
    const run = this.runs.get(rest.join(':'));
    if (action === 'cancel') {
      this.notify.error(`Could not cancel: ${msg.error}`);
    } else if (action === 'sub' && run && !isTerminal(run)) {
      this.patch(run, { status: 'failed', error: `The server no longer has this request: ${msg.error}` });
    }
    return true;
  }
}
