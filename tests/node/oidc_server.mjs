// A real, strict OAuth 2.0 / OpenID Connect server for the interop tests: `oidc-provider` from
// npm, with refresh-token rotation and no reuse grace. Presenting a refresh token that was
// already rotated revokes the whole grant (oidc-provider's reuse detection), so any double use
// by the agent shows up as a dead grant.
//
//   node oidc_server.mjs PORT      (0: any free port)
//
// Prints `PORT <n>` when it listens, then one JSON line: the issuer, and a refresh token and
// access token minted for
// client `agent-client` (as an authorization-code flow with offline_access would have left
// them). `GET /stats?grant=ID` answers how many token requests were made and whether the grant
// is alive, and the refresh tokens it issued (newest last); `POST /mint` mints another grant.
// `ACCESS_TTL` (seconds, default 3600) sets the access tokens' lifetime. `GET /me` is the provider's own userinfo endpoint: 401 for any token it does not
// know, so it serves as the "app" a connector calls with the bearer token.
import net from 'node:net';
import Provider from 'oidc-provider';

// The issuer names the port, so a free one is found before the provider is made.
async function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.on('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

const port = Number(process.argv[2] || 0) || (await freePort());
const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'agent-client',
      // Characters that form-encoding and Basic auth get wrong if done carelessly.
      client_secret: 'agent secret:+%/=~',
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      redirect_uris: ['https://example.invalid/cb'],
      token_endpoint_auth_method: 'client_secret_basic',
    },
    {
      client_id: 'service-client',
      client_secret: 'service-secret',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_post',
      scope: 'api:read',
    },
  ],
  scopes: ['openid', 'offline_access', 'api:read'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
  },
  rotateRefreshToken: true,
  issueRefreshToken: async () => true,
  ttl: {
    AccessToken: Number(process.env.ACCESS_TTL || 3600),
    ClientCredentials: 3600,
    RefreshToken: 14 * 24 * 3600,
    Grant: 14 * 24 * 3600,
  },
  findAccount: async (ctx, id) => ({ accountId: id, claims: async () => ({ sub: id }) }),
});
provider.proxy = false;

let tokenRequests = 0;
const issuedRefreshTokens = [];
provider.on('refresh_token.saved', (token) => issuedRefreshTokens.push(token.jti));
let grantErrors = [];
provider.on('grant.error', (ctx, err) => grantErrors.push(`${err.error}: ${err.error_description}`));
provider.use(async (ctx, next) => {
  if (ctx.path === '/token' && ctx.method === 'POST') tokenRequests += 1;
  if (ctx.path === '/stats') {
    const id = ctx.query.grant;
    const grant = id ? await provider.Grant.find(id) : undefined;
    ctx.body = {
      token_requests: tokenRequests,
      grant_alive: Boolean(grant),
      grant_errors: grantErrors,
      issued_refresh_tokens: issuedRefreshTokens,
    };
    return;
  }
  if (ctx.path === '/mint' && ctx.method === 'POST') {
    ctx.body = await mint();
    return;
  }
  await next();
});

// A grant as an authorization-code flow with offline_access would have left it.
async function mint() {
  const client = await provider.Client.find('agent-client');
  const grant = new provider.Grant({ accountId: 'user-1', clientId: client.clientId });
  grant.addOIDCScope('openid offline_access');
  const grantId = await grant.save();
  const now = Math.floor(Date.now() / 1000);
  const refresh = new provider.RefreshToken({
    accountId: 'user-1', client, grantId, scope: 'openid offline_access', gty: 'authorization_code', authTime: now,
  });
  const refreshToken = await refresh.save();
  const access = new provider.AccessToken({ accountId: 'user-1', client, grantId, scope: 'openid offline_access', gty: 'authorization_code' });
  const accessToken = await access.save();
  return { issuer, grant_id: grantId, refresh_token: refreshToken, access_token: accessToken };
}
const minted = await mint();

const server = provider.listen(port, '127.0.0.1', () => {
  process.stdout.write(`PORT ${port}\n`);
  process.stdout.write(JSON.stringify(minted) + '\n');
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
