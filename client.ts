// The browser client (served as /client.js). Placeholder until the client lands.
export {};
