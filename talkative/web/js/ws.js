// The WebSocket to the server, reconnecting with exponential back-off (0.5 s doubling to 15 s, with jitter).
// A close with 1008 (policy violation), or a refused handshake while REST answers 401, means a key is needed:
// then it waits for one instead of retrying. A connection that stays silent (the server sends a queue_update
// every few seconds) is treated as dead and replaced.
import { getKey } from './auth.js';
import { serverUrl } from './api.js';

const CONNECT_TIMEOUT_MS = 8000;
const SILENCE_LIMIT_MS = 45000;
const PING_EVERY_MS = 20000;
const MAX_DELAY_MS = 15000;

export class Socket {
  constructor({ onMessage, onState, needsKey }) {
    this.onMessage = onMessage;
    this.onStateChange = onState;
    this.needsKey = needsKey;
    this.ws = null;
    this.attempt = 0;
    this.connections = 0; // how many times a connection opened (a new one means: subscribe again)
    this.timer = null;
    this.heartbeat = null;
    this.state = { name: 'idle' };
  }

  url() {
    const url = serverUrl('ws');
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    const key = getKey();
    if (key) url.searchParams.set('api_key', key);
    return url.toString();
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  setState(name, extra = {}) {
    this.state = { name, ...extra };
    this.onStateChange(this.state);
  }

  start() {
    window.addEventListener('online', () => this.state.name === 'waiting' && this.reconnectNow());
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden && this.state.name === 'waiting') this.reconnectNow();
    });
    this.open();
  }

  /** Drop the current connection (if any) and connect at once, e.g. after the API key changed. */
  reconnectNow() {
    clearTimeout(this.timer);
    this.attempt = 0;
    const old = this.ws;
    this.ws = null;
    if (old) old.close(1000, 'reconnecting');
    this.open();
  }

  open() {
    clearTimeout(this.timer);
    this.setState('connecting', { attempt: this.attempt });
    let ws;
    try {
      ws = new WebSocket(this.url());
    } catch {
      this.retry();
      return;
    }
    this.ws = ws;
    let opened = false;
    const timeout = setTimeout(() => !opened && ws.close(), CONNECT_TIMEOUT_MS);
    ws.onopen = () => {
      if (this.ws !== ws) return;
      opened = true;
      clearTimeout(timeout);
      this.attempt = 0;
      this.connections += 1;
      this.lastHeard = Date.now();
      this.startHeartbeat(ws);
      this.setState('open');
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      this.lastHeard = Date.now();
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (message && typeof message.type === 'string') this.onMessage(message);
    };
    ws.onclose = async (event) => {
      clearTimeout(timeout);
      this.stopHeartbeat();
      if (this.ws !== ws) return; // replaced on purpose
      this.ws = null;
      const refused = getKey() ? 'The server refused this API key.' : 'The server needs an API key.';
      if (event.code === 1008) {
        this.setState('auth', { reason: event.reason ? `${refused} (${event.reason})` : refused });
        return;
      }
      if (!opened && (await this.needsKey())) {
        this.setState('auth', { reason: refused });
        return;
      }
      this.retry(opened ? 'The connection was lost.' : 'The server cannot be reached.');
    };
  }

  retry(reason) {
    const delay = Math.min(MAX_DELAY_MS, 500 * 2 ** this.attempt) * (0.8 + Math.random() * 0.4);
    this.attempt += 1;
    this.setState('waiting', { reason, retryAt: Date.now() + delay, attempt: this.attempt });
    this.timer = setTimeout(() => this.open(), delay);
  }

  startHeartbeat(ws) {
    this.stopHeartbeat();
    this.heartbeat = setInterval(() => {
      if (Date.now() - this.lastHeard > SILENCE_LIMIT_MS) ws.close(4000, 'silent');
      else if (Date.now() - this.lastHeard > PING_EVERY_MS) this.send({ type: 'ping' });
    }, 5000);
  }

  stopHeartbeat() {
    clearInterval(this.heartbeat);
    this.heartbeat = null;
  }

  /** Send a message now; false when not connected (the caller decides what to do then). */
  send(message) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }
}
