// The API key, when the server needs one: kept in the browser's storage, sent as `Authorization: Bearer` on
// REST and as the `api_key` query parameter on the WebSocket (browsers cannot set WebSocket headers).
import { load, save } from './prefs.js';

export function getKey() {
  return load('apiKey', '') || '';
}

export function setKey(key) {
  save('apiKey', key ? key.trim() : null);
}

export function authHeaders() {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}
