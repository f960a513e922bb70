// Mint a taskcast access token with the `jose` package (npm install jose@5), as any
// generation service can (README, "Access control"):
//
//   TASKCAST_JWT_SECRET=<the gateway's secret> node mint_token.mjs 41 42
//
// Prints a token that opens tasks 41 and 42 for 600 s.
import { SignJWT } from 'jose';

const secret = process.env.TASKCAST_JWT_SECRET; // the gateway's HS256 secret, >= 32 bytes
if (!secret) throw new Error('set TASKCAST_JWT_SECRET');
// Ids above 2^53 do not fit a JavaScript number: they go as decimal strings.
const tasks = process.argv.slice(2).map((id) =>
  BigInt(id) > BigInt(Number.MAX_SAFE_INTEGER) ? id : Number(id));
const token = await new SignJWT({ tasks })
  .setProtectedHeader({ alg: 'HS256' })
  .setExpirationTime(Math.floor(Date.now() / 1000) + 600) // exp is required
  .sign(new TextEncoder().encode(secret));
console.log(token);
