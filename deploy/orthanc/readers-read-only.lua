-- Readers read, nothing else, whichever way they reach Orthanc (the viewer's origin, Orthanc's
-- own HTTP port, a script with their password). Orthanc asks this filter about every HTTP request
-- once the account is authenticated; false refuses it (403).
--
-- - An account in FULL_ACCESS may do anything (the PACS administrator).
-- - An account in STORES_RESULTS may also store by STOW-RS (the AI node, where it sends its
--   results over DICOMweb with "CXR_DICOM_DESTINATION_DICOMWEB"; add its account here).
-- - Every other registered account is a reader: GET on the DICOMweb root's studies, series and
--   instances (QIDO-RS, and WADO-RS metadata, frames, rendered images and bulk data, all under
--   those). Not STOW-RS, not Orthanc's REST API (it lists patients by name, deletes, modifies,
--   sends studies to modalities), not Orthanc Explorer, not /dicom-web/servers (the DICOMweb
--   client: the PACS's peers, and pushing studies to them).
--
-- Add readers to "RegisteredUsers" (one account per radiologist, or an identity provider in
-- front, see the README); list this script under "LuaScripts".

local FULL_ACCESS = { ['admin'] = true }
local STORES_RESULTS = {}

local READABLE = {
  '^/dicom%-web/studies$', '^/dicom%-web/studies/',
  '^/dicom%-web/series$', '^/dicom%-web/series/',
  '^/dicom%-web/instances$', '^/dicom%-web/instances/',
}

local function readable(uri)
  for _, pattern in ipairs(READABLE) do
    if string.find(uri, pattern) ~= nil then
      return true
    end
  end
  return false
end

function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if FULL_ACCESS[username] then
    return true
  end
  if method == 'POST' and STORES_RESULTS[username] then
    return string.find(uri, '^/dicom%-web/studies/?$') ~= nil
  end
  return method == 'GET' and readable(uri)
end
