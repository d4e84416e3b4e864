// The wire vocabulary of party-sockets, shared by the relay (server.ts) and the
// browser client (client.ts). Message types, field names, close codes 4000/4001
// and the error texts marked "Party-Sockets" are the Party-Sockets 2.x protocol;
// everything else is a backwards-compatible addition.
//
// client.ts imports only *types* from here (erased when it is transpiled), so the
// served /client.js stays a single dependency-free module.

// ---------------------------------------------------------------- messages in

export type ClientMessage =
  | CreateMessage
  | JoinMessage
  | SendMessage
  | SetStateMessage
  | CloseRoomMessage
  | LeaveMessage
  | KickMessage
  | PingMessage;

export interface CreateMessage {
  type: "create";
  clientId: string;
  maxClients: number;
  url?: string;
}
export interface JoinMessage {
  type: "join";
  clientId: string;
  room: string;
  /** Lossless reconnect: the last `seq` this client received (issue 9). */
  resume?: number;
}
export interface SendMessage {
  type: "send";
  /** Absent: every other present member. A slot, or a list of slots. */
  to?: number | number[];
  /** Lossless sends (issue 16): this slot's frame number, rising by one per numbered frame. */
  n?: number;
  data?: unknown;
}
export interface SetStateMessage {
  type: "set_state";
  /** As on `send`: numbers share one counter per slot. */
  n?: number;
  data: unknown;
}
export interface CloseRoomMessage {
  type: "close_room";
}
export interface LeaveMessage {
  type: "leave";
}
/** Host only: remove the member in slot `index` for the room's life (issue 15). */
export interface KickMessage {
  type: "kick";
  index: number;
}
export interface PingMessage {
  type: "ping";
  id?: unknown;
}

// --------------------------------------------------------------- messages out

export type ServerMessage =
  | CreatedMessage
  | JoinedMessage
  | PeerJoinedMessage
  | PeerLeftMessage
  | RelayedMessage
  | StateMessage
  | LeftMessage
  | PongMessage
  | MovedMessage
  | ErrorMessage;

export interface CreatedMessage {
  type: "created";
  room: string;
  index: 0;
  instance: string;
  region: string;
  url?: string;
  /** Always 0: a new room has relayed nothing yet (the starting point for `resume`). */
  seq: 0;
}
export interface JoinedMessage {
  type: "joined";
  room: string;
  index: number;
  /** The other present slots, ascending. */
  peers: number[];
  instance: string;
  region: string;
  url?: string;
  /** The room's latest `seq` at the time of joining. */
  seq: number;
  /** Only when `join` carried `resume`: whether every missed frame follows. */
  resumed?: boolean;
  /** With `resumed: false`: the oldest `seq` the relay still holds. */
  oldest?: number;
  /** The highest `n` the relay accepted from this slot; absent when it never accepted one. */
  received?: number;
}
export interface PeerJoinedMessage {
  type: "peer_joined";
  index: number;
}
export interface PeerLeftMessage {
  type: "peer_left";
  index: number;
}
export interface RelayedMessage {
  type: "message";
  from: number;
  /** Per-room sequence number, the same for every recipient (lossless reconnect). */
  seq: number;
  data?: unknown;
}
export interface StateMessage {
  type: "state";
  seq: number;
  data: unknown;
}
export interface LeftMessage {
  type: "left";
  room: string;
}
export interface PongMessage {
  type: "pong";
  id?: unknown;
  /** Server clock, ms since the epoch. */
  t: number;
  /** In a room: the highest `n` accepted from this slot, as on `joined`. */
  received?: number;
}
/** The room moved to another machine (a deploy): reconnect there, then close 4005 follows. */
export interface MovedMessage {
  type: "moved";
  /** The machine that holds the room now: reconnect with `?instance=<instance>`. */
  instance: string;
}
export interface ErrorMessage {
  type: "error";
  code: ErrorCode;
  message: string;
  /** With `target_not_found` on `to: [...]`: the slots that were not present. */
  missing?: number[];
  /** With `rate_limited` on a `join` refused by the miss budget: when this IP may ask again. */
  retryAfterMs?: number;
}

// --------------------------------------------------------------------- errors

/** Every error the relay sends, with its default text (Party-Sockets text where one exists). */
export const ERRORS = {
  invalid_json: "Invalid JSON",
  unknown_type: "Unknown message type",
  invalid_client_id: "clientId is required",
  invalid_max_clients: "maxClients must be a positive number",
  invalid_room: "room is required",
  invalid_resume: "resume must be a non-negative integer",
  invalid_n: "n must be a positive safe integer",
  invalid_url: "url must be an https URL",
  room_not_found: "Room not found",
  room_full: "Room is full",
  already_in_room: "Already in a room",
  not_in_room: "Not in a room",
  target_not_found: "Target peer not found",
  not_host: "Only the host can do this",
  state_required: "State data is required",
  state_too_large: "State too large",
  draining: "Server draining",
  message_too_large: "Message too large",
  rate_limited: "Rate limited: messages are being dropped",
  binary_unsupported: "Binary frames are not supported; send JSON text",
  too_many_rooms: "Too many rooms",
  kicked: "Removed by the host",
  /** Any frame from a member while its room is handed to another machine: nothing was relayed, resend after the move. */
  moving: "Room is moving to another server",
} as const;

export type ErrorCode = keyof typeof ERRORS;

// ---------------------------------------------------------------- close codes

/** Every close the relay initiates, with the reason it sends. */
export const CLOSES = {
  replaced: { code: 4000, reason: "replaced" },
  roomClosed: { code: 4001, reason: "room closed" },
  slowConsumer: { code: 4002, reason: "slow consumer" },
  unresponsive: { code: 4003, reason: "unresponsive" },
  kicked: { code: 4004, reason: "kicked" },
  policy: { code: 1008, reason: "too many connections" },
  tooLarge: { code: 1009, reason: "message too large" },
  shutdown: { code: 1001, reason: "server shutting down" },
  /** After `moved`: the room lives on another machine now (a deploy hand-off). */
  moved: { code: 4005, reason: "moved" },
} as const;

export type CloseName = keyof typeof CLOSES;
export type CloseCode = (typeof CLOSES)[CloseName]["code"];
