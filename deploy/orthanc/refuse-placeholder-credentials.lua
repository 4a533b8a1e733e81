-- Stop Orthanc at start-up when a credential in its configuration is empty or a placeholder.
--
-- orthanc.json reads its secrets from the environment (${ORTHANC_ADMIN_PASSWORD},
-- ${ORTHANC_CXR_AI_KEY}); Orthanc puts an empty string where a variable is unset, which would
-- leave an account anyone can use. An empty key for the node's DICOMweb server is no credential
-- at all (the node refuses it), so only a placeholder there stops Orthanc. List this script
-- first under "LuaScripts".

local function credential(value)
  local text = string.lower(value or '')
  text = string.gsub(text, '^%s*bearer%s*', '')
  return string.gsub(text, '^%s*basic%s*', '')
end

local function isPlaceholder(value)
  local text = credential(value)
  return string.find(text, 'change.?me') ~= nil or string.find(text, 'replace.?me') ~= nil
end

function Initialize()
  local config = GetOrthancConfiguration()
  local refused = {}
  if config['AuthenticationEnabled'] ~= false then
    for user, password in pairs(config['RegisteredUsers'] or {}) do
      if credential(password) == '' or isPlaceholder(password) then
        table.insert(refused, 'RegisteredUsers/' .. user)
      end
    end
  end
  local servers = (config['DicomWeb'] or {})['Servers'] or {}
  for name, server in pairs(servers) do
    local headers = (type(server) == 'table' and server['HttpHeaders']) or {}
    if headers['Authorization'] ~= nil and isPlaceholder(headers['Authorization']) then
      table.insert(refused, 'DicomWeb/Servers/' .. name .. '/Authorization')
    end
  end
  if #refused > 0 then
    print('refusing to run: empty or placeholder credential in ' .. table.concat(refused, ', ')
      .. ' (set the environment variables orthanc.json reads)')
    RestApiPost('/tools/shutdown', '')
  end
end
