// The browser's storage for what a user should not have to set again (API key, options, columns, drafts).
// Storage can be unavailable (private modes, quotas): then the UI works with defaults.

const PREFIX = 'talkative.';

export function load(key, fallback) {
  try {
    const raw = localStorage.getItem(PREFIX + key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

export function save(key, value) {
  try {
    if (value === undefined || value === null) localStorage.removeItem(PREFIX + key);
    else localStorage.setItem(PREFIX + key, JSON.stringify(value));
  } catch {
    /* storage full or disabled: the value lives for this page only */
  }
}
