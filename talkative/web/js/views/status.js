// The status line in the header: connection, server queue, and the chosen model's load state.
import { findModel, loadState } from '../models.js';

export function createStatus({ store, socket, onKey }) {
  const conn = document.getElementById('conn');
  const connText = document.getElementById('conn-text');
  const queueText = document.getElementById('queue-text');
  const modelState = document.getElementById('model-state');
  const keyButton = document.getElementById('key-button');
  const retry = document.getElementById('reconnect');
  retry.addEventListener('click', () => socket.reconnectNow());

  function renderConnection(state) {
    conn.dataset.state = state.name;
    const texts = {
      idle: 'Not connected',
      connecting: state.attempt ? 'Reconnecting…' : 'Connecting…',
      open: 'Connected',
      waiting: `Disconnected, retrying (attempt ${state.attempt})`,
      auth: 'API key needed',
    };
    connText.textContent = texts[state.name] || state.name;
    retry.hidden = state.name !== 'waiting';
    conn.title = state.reason || '';
    if (state.name === 'auth') onKey(state.reason);
  }

  function renderQueue(q) {
    if (!q) {
      queueText.textContent = '';
      return;
    }
    const running = q.processing_requests || 0;
    const waiting = q.queued_requests ?? Math.max(0, (q.queue_size || 0) - running);
    queueText.textContent = q.queue_size ? `Queue: ${waiting} waiting, ${running} running` : 'Queue: empty';
  }

  function renderModel() {
    const listing = store.get('models');
    const found = findModel(listing, store.get('modelId'));
    if (!found) {
      modelState.textContent = '';
      return;
    }
    const state = loadState(found.group, store.get('switching'));
    modelState.dataset.state = state.key;
    modelState.textContent = `${found.model.name}: ${state.key === 'unloaded' ? 'not loaded' : state.text}`;
  }

  function renderKey(key) {
    keyButton.textContent = key ? 'API key ✓' : 'API key';
    keyButton.setAttribute('aria-label', key ? 'API key (set): change or forget it' : 'Set an API key');
  }

  store.on('connection', renderConnection);
  store.on('queue', renderQueue);
  store.on('models', renderModel);
  store.on('modelId', renderModel);
  store.on('switching', renderModel);
  store.on('apiKey', renderKey);
  renderConnection(socket.state);
  renderKey(store.get('apiKey'));
}
