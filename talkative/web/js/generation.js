// Generation runs over the WebSocket `generate` message: `queued`, then `token` messages
// ({token, position, finish_reason, completion?}) as they are produced, then `generation_complete`
// ({completions: [...]}, or the scheduler's generic `generate_complete` {result: {completions}}).
import { CONTROL, newId } from './ids.js';

const TERMINAL = new Set(['completed', 'failed', 'cancelled']);

function explain(error) {
  if (/unknown message type 'generate'/.test(error)) {
    return 'This server does not offer generation (its WebSocket has no “generate” message yet).';
  }
  return error;
}

export class Generations {
  constructor({ store, socket, notify }) {
    this.store = store;
    this.socket = socket;
    this.notify = notify;
    this.runs = new Map();
    this.byRequest = new Map();
  }

  current() {
    return this.runs.get(this.store.get('generation')) || null;
  }

  changed(run) {
    if (run.requestId) this.byRequest.set(run.requestId, run);
    this.store.emit('generation', run);
  }

  start({ input, modelId, options }) {
    const run = {
      id: newId('gen'),
      requestId: null,
      status: 'sending',
      input,
      modelId,
      options,
      completions: Array.from({ length: options.num_completions || 1 }, () => ({ text: '', finish: null })),
      error: null,
      queuePosition: null,
    };
    this.runs.set(run.id, run);
    const frame = { type: 'generate', ...input, options, model_id: modelId || undefined, client_request_id: run.id };
    if (!this.socket.send(frame)) {
      run.status = 'failed';
      run.error = 'Not connected to the server; generation needs the live connection. It reconnects on its own.';
    }
    this.store.set('generation', run.id);
    return run;
  }

  cancel(run) {
    if (!run || TERMINAL.has(run.status)) return;
    const frame = run.requestId
      ? { type: 'cancel_request', request_id: run.requestId, client_request_id: `${CONTROL}gcancel:${run.id}` }
      : { type: 'cancel_request', client_request_id: run.id };
    if (!this.socket.send(frame)) this.notify.error('Not connected: the generation cannot be stopped right now.');
  }

  handle(msg) {
    const crid = msg.client_request_id;
    if (typeof crid === 'string' && crid.startsWith(`${CONTROL}gcancel:`)) {
      if (msg.type === 'error') this.notify.error(`Could not stop the generation: ${msg.error}`);
      return true;
    }
    const run = (crid && this.runs.get(crid)) || (msg.request_id && this.byRequest.get(msg.request_id));
    if (!run) return false;
    if (msg.request_id) run.requestId = msg.request_id;
    switch (msg.type) {
      case 'queued':
        run.status = 'queued';
        run.queuePosition = msg.queue_position;
        break;
      case 'processing':
        run.status = 'processing';
        run.queuePosition = null;
        break;
      case 'token': {
        run.status = 'processing';
        const i = Number.isInteger(msg.completion) ? msg.completion : 0;
        while (run.completions.length <= i) run.completions.push({ text: '', finish: null });
        run.completions[i].text += msg.token || '';
        if (msg.finish_reason) run.completions[i].finish = msg.finish_reason;
        break;
      }
      case 'generation_complete':
      case 'generate_complete': {
        const texts = msg.completions || msg.result?.completions || [];
        const reasons = msg.finish_reasons || msg.result?.finish_reasons || [];
        if (texts.length) {
          run.completions = texts.map((text, i) => ({
            text: typeof text === 'string' ? text : String(text?.text ?? ''),
            finish: reasons[i] || run.completions[i]?.finish || null,
          }));
        }
        run.status = 'completed';
        break;
      }
      case 'error':
      case 'generation_error':
        run.status = 'failed';
        run.error = explain(msg.error || 'The server reported an error.');
        break;
      case 'request_cancelled':
        run.status = 'cancelled';
        break;
      case 'queue_update':
        return false;
      default:
        return false;
    }
    this.changed(run);
    return true;
  }
}
