// The page's shared state: named values with listeners, so views update when what they show changes.

export class Store {
  constructor(initial = {}) {
    this.values = { ...initial };
    this.listeners = new Map();
  }

  get(key) {
    return this.values[key];
  }

  set(key, value) {
    this.values[key] = value;
    this.emit(key, value);
  }

  /** Notify listeners of a value that was changed in place (e.g. a run's progress). */
  emit(key, detail) {
    for (const fn of this.listeners.get(key) || []) fn(this.values[key], detail);
  }

  on(key, fn) {
    if (!this.listeners.has(key)) this.listeners.set(key, new Set());
    this.listeners.get(key).add(fn);
    return () => this.listeners.get(key).delete(fn);
  }
}
