// Asking for the API key: when the server answers 401 or closes the WebSocket with 1008, or on demand.
import { getKey, setKey } from '../auth.js';

export function createKeyDialog({ store, onChange }) {
  const dialog = document.getElementById('key-dialog');
  const form = document.getElementById('key-form');
  const input = document.getElementById('key-input');
  const reason = document.getElementById('key-reason');
  const forget = document.getElementById('key-forget');

  function open(why = '') {
    if (dialog.open) {
      if (why) reason.textContent = why;
      return;
    }
    reason.textContent = why || 'Set the key this server was started with (API_KEY).';
    input.value = getKey();
    forget.hidden = !getKey();
    dialog.showModal();
    input.focus();
  }

  form.addEventListener('submit', (event) => {
    const action = event.submitter?.value;
    if (action === 'save') {
      if (!input.value.trim()) {
        event.preventDefault();
        reason.textContent = 'Enter a key, or cancel.';
        input.focus();
        return;
      }
      setKey(input.value);
    } else if (action === 'forget') {
      setKey('');
    } else return;
    store.set('apiKey', getKey());
    onChange();
  });

  return { open };
}
